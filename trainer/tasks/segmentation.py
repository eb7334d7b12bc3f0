"""The segmentation task: segmentation-models-pytorch networks, smp's losses, mIoU/Dice/pixel accuracy from an
all-reduced pixel confusion matrix, and predicted masks written as PNGs.

``model.numClasses`` 1 is binary segmentation: one output channel, a sigmoid, masks of 0 and 1 (metrics then
count two classes, background and foreground). More classes are multi-class: softmax over numClasses channels.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import segmentation_models_pytorch as smp
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from kiln.api.catalogue import TIMM_ENCODER_PREFIX, unknown_name_message
from kiln.api.resolve import DEFAULT_IGNORE_INDEX, ResolvedTrainingJob
from kiln.storage import Store, open_store
from kiln.trainer.errors import InvalidInput
from kiln.trainer.metrics import SegmentationMetrics, pixel_confusion, segmentation_from_confusion
from kiln.trainer.models import build_model, load_matching, matching_tensors, read_weights
from kiln.trainer.registry import Registry
from kiln.trainer.tasks.base import Batch, LossInfo, SplitData, TaskData, weighted_loss
from kiln.trainer.tasks.segmentation_data import MaskedImages, hold_out, read_split

LossFn = Callable[[Any, Batch], torch.Tensor]
LossBuilder = Callable[[ResolvedTrainingJob, TaskData], LossFn]


def ignore_index(job: ResolvedTrainingJob) -> int:
    value = job.spec.data.ignore_index  # resolved: set for every segmentation job
    return DEFAULT_IGNORE_INDEX if value is None else value


# -- the network -------------------------------------------------------------------------------------------------


def _check_encoder(name: str) -> None:
    if name.startswith(TIMM_ENCODER_PREFIX):
        if not timm.is_model(name.removeprefix(TIMM_ENCODER_PREFIX)):
            raise InvalidInput(unknown_name_message("model.encoder timm model (tu-<name>)", name, []))
        return
    encoders = smp.encoders.get_encoder_names()
    if name not in encoders:
        raise InvalidInput(unknown_name_message("model.encoder (an smp encoder, or tu-<timm model>)", name, encoders))


def build_segmentation_model(job: ResolvedTrainingJob, num_classes: int) -> nn.Module:
    spec, image_size = job.spec.model, job.spec.data.image_size
    if spec.source:  # a plugin builds the whole network
        return build_model(spec, num_classes, job.spec.storage)
    architecture = spec.architecture.lower()
    if architecture not in smp.MODEL_ARCHITECTURES_MAPPING:
        valid = smp.MODEL_ARCHITECTURES_MAPPING
        raise InvalidInput(unknown_name_message("model.architecture (an smp architecture)", spec.architecture, valid))
    encoder = spec.encoder or ""
    _check_encoder(encoder)
    try:
        # encoder_weights=None always: there is no model hub at run time; weights come from model.pretrained.
        model = smp.create_model(architecture, encoder_name=encoder, encoder_weights=None, classes=num_classes)
    except (ValueError, KeyError, TypeError, AssertionError, RuntimeError) as exc:
        raise InvalidInput(f"model: smp cannot build {architecture} with encoder {encoder}: {exc}") from exc
    stride = getattr(getattr(model, "encoder", None), "output_stride", 1)
    if getattr(model, "requires_divisible_input_shape", False) and image_size % stride:
        needs = f"{architecture} with {encoder} needs a multiple of {stride}"
        raise InvalidInput(f"data.imageSize: {needs}, not {image_size}")
    if spec.pretrained:
        load_segmentation_weights(model, spec.pretrained, job)
    return model


def load_segmentation_weights(model: nn.Module, uri: str, job: ResolvedTrainingJob) -> None:
    """A whole network (a Kiln checkpoint of the same architecture) or the encoder alone (a backbone's state
    dict: an smp encoder's, or a timm model's for tu- encoders): whichever part matches more tensors."""
    weights = read_weights(uri, job.spec.storage)
    encoder = getattr(model, "encoder", None)
    candidates = [model, encoder, getattr(encoder, "model", None)]  # tu- encoders keep the timm model in .model
    parts = [part for part in candidates if isinstance(part, nn.Module)]
    best = max(parts, key=lambda part: len(matching_tensors(part, weights)))
    if not matching_tensors(best, weights):
        raise InvalidInput(f"model.pretrained: no tensor in {uri} matches the network or its encoder")
    load_matching(best, weights, uri)


# -- losses (smp's, plus torch's cross-entropy, which alone takes class weights, ignore index and smoothing) --


def _class_weights(job: ResolvedTrainingJob, data: TaskData) -> list[float] | None:
    weights = job.spec.loss.class_weights
    if weights is None:
        return None
    if data.num_classes == 1:
        raise InvalidInput("loss.classWeights: binary segmentation (numClasses 1) takes no class weights")
    if len(weights) != data.num_classes:
        raise InvalidInput(f"loss.classWeights has {len(weights)} entries for {data.num_classes} classes")
    return list(weights)


def _mode(data: TaskData) -> str:
    return smp.losses.BINARY_MODE if data.num_classes == 1 else smp.losses.MULTICLASS_MODE


def _smp_loss(cls: Callable[..., nn.Module], *, weighted: bool = True) -> LossBuilder:
    def build(job: ResolvedTrainingJob, data: TaskData) -> LossFn:
        extra = {"class_weights": _class_weights(job, data)} if weighted and data.num_classes > 1 else {}
        if not weighted and job.spec.loss.class_weights is not None:
            raise InvalidInput("loss.classWeights: lovasz takes no class weights")
        loss = cls(_mode(data), ignore_index=ignore_index(job), **extra)

        def apply(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
            return loss(logits, batch["mask"])

        return apply

    return build


def _binary_cross_entropy(job: ResolvedTrainingJob, data: TaskData) -> LossFn:
    if data.num_classes != 1:
        raise InvalidInput(f"loss: bce needs model.numClasses 1, not {data.num_classes}; use cross_entropy")
    ignore, smoothing = ignore_index(job), job.spec.augmentation.label_smoothing

    def loss(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        mask = batch["mask"]
        keep = mask != ignore
        target = torch.where(keep, mask, 0).float() * (1 - smoothing) + 0.5 * smoothing
        per_pixel = F.binary_cross_entropy_with_logits(logits[:, 0], target, reduction="none")
        return (per_pixel * keep).sum() / keep.sum().clamp(min=1)

    return loss


def _cross_entropy(job: ResolvedTrainingJob, data: TaskData) -> LossFn:
    if data.num_classes == 1:
        return _binary_cross_entropy(job, data)
    weights = _class_weights(job, data)
    weight = torch.tensor(weights) if weights is not None else None
    ignore, smoothing = ignore_index(job), job.spec.augmentation.label_smoothing

    def loss(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        w = weight.to(logits.device) if weight is not None else None
        return F.cross_entropy(logits, batch["mask"], weight=w, ignore_index=ignore, label_smoothing=smoothing)

    return loss


LOSSES: Registry[LossInfo] = Registry("segmentation loss")
for _name, _build, _text in (
    ("dice", _smp_loss(smp.losses.DiceLoss), "smp DiceLoss"),
    ("jaccard", _smp_loss(smp.losses.JaccardLoss), "smp JaccardLoss (soft IoU)"),
    ("focal", _smp_loss(smp.losses.FocalLoss), "smp FocalLoss"),
    ("lovasz", _smp_loss(smp.losses.LovaszLoss, weighted=False), "smp LovaszLoss"),
    ("tversky", _smp_loss(smp.losses.TverskyLoss), "smp TverskyLoss (alpha = beta = 0.5)"),
    ("cross_entropy", _cross_entropy, "cross-entropy (binary when numClasses is 1), class weights, smoothing"),
    ("bce", _binary_cross_entropy, "binary cross-entropy, numClasses 1 only"),
):
    LOSSES.register(LossInfo(_name, _build, _text))


class SegmentationObjective:
    def __init__(self, job: ResolvedTrainingJob, data: TaskData) -> None:
        self._loss = weighted_loss(LOSSES, job, data)

    def forward(self, model: nn.Module, batch: Batch, *, training: bool) -> torch.Tensor:
        return model(batch["image"])

    def loss(self, outputs: torch.Tensor, batch: Batch) -> torch.Tensor:
        return self._loss(outputs.float(), batch)

    def loss_terms(self) -> Mapping[str, torch.Tensor]:
        return self._loss.terms


# -- evaluation ----------------------------------------------------------------------------------------------


class SegmentationEvaluator:
    """Metrics over a split from one pixel confusion matrix summed over every rank; per image, the predicted mask
    (a PNG of class indices at the image's own size) and its mIoU (at the evaluated size, imageSize)."""

    METRICS = ("miou", "dice", "pixel_accuracy", "loss")  # plus iou/<class> for each class

    def __init__(self, job: ResolvedTrainingJob, data: TaskData, device: torch.device) -> None:
        self.binary = data.num_classes == 1
        self.classes = 2 if self.binary else data.num_classes
        self.ignore_index = ignore_index(job)
        self.metric_names = (*self.METRICS, *(f"iou/{k}" for k in range(self.classes)))
        self.metrics = SegmentationMetrics(self.classes, self.ignore_index, device)
        self._job = job
        self._store: Store | None = None

    def predict(self, outputs: torch.Tensor) -> torch.Tensor:
        return (outputs[:, 0] > 0).long() if self.binary else outputs.argmax(dim=1)

    def update(self, outputs: torch.Tensor, batch: Batch, loss: torch.Tensor) -> None:
        mask = batch["mask"]
        self.metrics.update(self.predict(outputs.float()), mask, loss.detach().double() * len(mask))

    def compute(self) -> dict[str, float]:
        return self.metrics.reduce().compute()

    def _write_png(self, key: str, predicted: torch.Tensor) -> None:
        if self._store is None:
            self._store = open_store(self._job.run_uri, self._job.spec.storage)
        values = predicted.cpu().numpy().astype(np.uint8 if self.classes <= 256 else np.uint16)
        buffer = io.BytesIO()
        Image.fromarray(values).save(buffer, format="PNG")
        self._store.write_bytes(key, buffer.getvalue())

    def prediction_rows(self, outputs: torch.Tensor, batch: Batch, data: SplitData) -> list[dict[str, Any]]:
        if not isinstance(data, MaskedImages):
            raise TypeError(f"segmentation predictions need MaskedImages, not {type(data).__name__}")
        logits = outputs.float()
        predicted = self.predict(logits)
        rows = []
        for i, index in enumerate(batch["index"].tolist()):
            per_image = pixel_confusion(predicted[i], batch["mask"][i], self.classes, self.ignore_index)
            scores = segmentation_from_confusion(per_image)
            height, width = batch["size"][i].tolist()
            full = F.interpolate(logits[i : i + 1], size=(height, width), mode="bilinear", align_corners=False)
            key = data.prediction_key(index)
            self._write_png(key, self.predict(full)[0])
            rows.append(
                {
                    "image": data.describe(index),
                    "mask": data.describe_mask(index),
                    "prediction": key,
                    "miou": round(scores["miou"], 6),
                    "pixel_accuracy": round(scores["pixel_accuracy"], 6),
                }
            )
        return rows


class SegmentationTask:
    def load_data(self, job: ResolvedTrainingJob, roots: Mapping[str, Path]) -> TaskData:
        spec = job.spec
        num_classes = spec.model.num_classes
        if num_classes is None:
            raise InvalidInput("model.numClasses: segmentation needs it (masks do not list their classes)")
        labels, ignore = max(num_classes, 2), ignore_index(job)
        if ignore < labels:
            raise InvalidInput(f"data.ignoreIndex: {ignore} is a class index; it must be at least {labels}")
        sources = {"train": spec.data.train, "val": spec.data.val, "test": spec.data.test}
        splits = {
            split: read_split(sources[split].format, root, split, labels=labels, ignore_index=ignore)  # type: ignore[union-attr]
            for split, root in roots.items()
        }
        if spec.data.val_split is not None:
            splits["train"], splits["val"] = hold_out(splits["train"], spec.data.val_split, spec.seed)
        names = ("background", "foreground") if num_classes == 1 else tuple(str(k) for k in range(num_classes))
        return TaskData(splits=splits, num_classes=num_classes, class_names=names)

    def build_model(self, job: ResolvedTrainingJob, data: TaskData) -> nn.Module:
        return build_segmentation_model(job, data.num_classes)

    def build_objective(self, job: ResolvedTrainingJob, data: TaskData) -> SegmentationObjective:
        return SegmentationObjective(job, data)

    def build_evaluator(self, job: ResolvedTrainingJob, data: TaskData, device: torch.device) -> SegmentationEvaluator:
        return SegmentationEvaluator(job, data, device)
