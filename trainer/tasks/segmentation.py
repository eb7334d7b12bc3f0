"""The segmentation task: segmentation-models-pytorch networks, smp's losses, mIoU/Dice/pixel accuracy (and
per-class IoU, Dice, precision and recall for evaluation.json) from an all-reduced pixel confusion matrix,
predicted masks written as PNGs, and overlays of the first few images.

``model.numClasses`` 1 is binary segmentation: one output channel, a sigmoid, masks of 0 and 1 (metrics then
count two classes, background and foreground). More classes are multi-class: softmax over numClasses channels.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from kiln.api.resolve import DEFAULT_IGNORE_INDEX, ResolvedTrainingJob
from kiln.storage import Store, open_store
from kiln.trainer.class_stats import auto_class_weights
from kiln.trainer.data import load_image
from kiln.trainer.errors import InvalidInput
from kiln.trainer.metrics import (
    SegmentationMetrics,
    class_scores,
    class_table,
    confusion_lists,
    pixel_confusion,
    segmentation_from_confusion,
)
from kiln.trainer.registry import Registry
from kiln.trainer.tasks.base import Batch, LossInfo, SplitData, TaskData, weighted_loss
from kiln.trainer.tasks.segmentation_data import MaskedImages, hold_out, palette_of, read_split
from kiln.trainer.tasks.segmentation_model import (
    PRESENCE,
    build_segmentation_model,
    encoder_transfer,
    masks_of,
    presence_loss,
)
from kiln.trainer.tasks.segmentation_overlay import class_colours, overlay_png
from kiln.trainer.transfer import Transfer

LossFn = Callable[[Any, Batch], torch.Tensor]
LossBuilder = Callable[[ResolvedTrainingJob, TaskData], LossFn]


def ignore_index(job: ResolvedTrainingJob) -> int:
    value = job.spec.data.ignore_index  # resolved: set for every segmentation job
    return DEFAULT_IGNORE_INDEX if value is None else value


# -- losses (smp's, plus torch's cross-entropy, which alone takes class weights, ignore index and smoothing) --


def _class_weights(job: ResolvedTrainingJob, data: TaskData) -> list[float] | None:
    weights = job.spec.loss.class_weights
    if weights is None:
        return None
    if data.num_classes == 1:
        raise InvalidInput("loss.classWeights: binary segmentation (numClasses 1) takes no class weights")
    if weights == "auto":
        return auto_class_weights(data.class_stats)
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
    (PRESENCE, presence_loss, "which classes each image contains, for model.args.aux_params' classification head"),
):
    LOSSES.register(LossInfo(_name, _build, _text))


class SegmentationObjective:
    def __init__(self, job: ResolvedTrainingJob, data: TaskData) -> None:
        self._loss = weighted_loss(LOSSES, job, data)

    def forward(self, model: nn.Module, batch: Batch, *, training: bool) -> torch.Tensor:
        return masks_of(model(batch["image"]), batch)

    def loss(self, outputs: torch.Tensor, batch: Batch) -> torch.Tensor:
        return self._loss(outputs.float(), batch)

    def loss_terms(self) -> Mapping[str, torch.Tensor]:
        return self._loss.terms

    def set_epoch(self, epoch: int) -> None:
        self._loss.set_epoch(epoch)

    def loss_weights(self) -> Mapping[str, float]:
        return self._loss.scheduled_weights()


# -- evaluation ----------------------------------------------------------------------------------------------


# Overlays for the first images of each evaluated split: enough to eyeball what the model does without
# writing a second copy of a large split (the predicted masks already hold every image).
SAMPLE_IMAGES = 8


class SegmentationEvaluator:
    """Metrics over a split from one pixel confusion matrix summed over every rank; per image, the predicted mask
    (a PNG of class indices at the image's own size), its mIoU and per-class IoU (at the evaluated size,
    imageSize), and for the first SAMPLE_IMAGES images an overlay (image | truth | prediction)."""

    METRICS = ("miou", "dice", "pixel_accuracy", "loss")  # plus iou/<class> for each class

    def __init__(self, job: ResolvedTrainingJob, data: TaskData, device: torch.device) -> None:
        self.binary = data.num_classes == 1
        self.classes = 2 if self.binary else data.num_classes
        self.class_names = (
            data.class_names if len(data.class_names) == self.classes else tuple(map(str, range(self.classes)))
        )
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

    def details(self) -> dict[str, Any]:
        """Per-class IoU, Dice, precision, recall and support (pixels, at imageSize, ignored ones left out) and
        the pixel confusion matrix, for evaluation.json."""
        confusion = self.metrics.reduce().confusion
        columns = {"iou": "iou", "dice": "f1", "precision": "precision", "recall": "recall"}
        return {
            "images": int(self.metrics.totals[1]),
            "ignoreIndex": self.ignore_index,
            "classes": class_table(confusion, self.class_names, columns),
            "confusion": confusion_lists(confusion),
        }

    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = open_store(self._job.run_uri, self._job.spec.storage)
        return self._store

    def _write_png(self, key: str, predicted: torch.Tensor) -> np.ndarray:
        values = predicted.cpu().numpy().astype(np.uint8 if self.classes <= 256 else np.uint16)
        buffer = io.BytesIO()
        Image.fromarray(values).save(buffer, format="PNG")
        self.store.write_bytes(key, buffer.getvalue())
        return values

    def _write_overlay(self, data: MaskedImages, index: int, predicted: np.ndarray) -> None:
        """Image | ground truth | prediction at the image's original size, from the files, not the batch."""
        key = f"samples/{data.split}/{Path(data.names[index]).with_suffix('.png').as_posix()}"
        colours = class_colours(self.classes)
        truth = data.read_mask(index)  # class indices, also for colour masks (data.palette)
        png = overlay_png(load_image(data.samples[index][0]), truth, predicted, colours, self.ignore_index)
        self.store.write_bytes(key, png)

    def _image_scores(self, predicted: torch.Tensor, mask: torch.Tensor) -> dict[str, Any]:
        """mIoU, pixel accuracy and iou/<class name>; a class in neither truth nor prediction has an empty IoU."""
        confusion = pixel_confusion(predicted, mask, self.classes, self.ignore_index)
        summary = segmentation_from_confusion(confusion)
        scores = class_scores(confusion)
        iou = {
            f"iou/{name}": round(float(value), 6) if present else ""
            for name, value, present in zip(self.class_names, scores["iou"], scores["present"], strict=True)
        }
        return {"miou": round(summary["miou"], 6), "pixel_accuracy": round(summary["pixel_accuracy"], 6), **iou}

    def prediction_rows(self, outputs: torch.Tensor, batch: Batch, data: SplitData) -> list[dict[str, Any]]:
        if not isinstance(data, MaskedImages):
            raise TypeError(f"segmentation predictions need MaskedImages, not {type(data).__name__}")
        logits = outputs.float()
        predicted = self.predict(logits)
        rows = []
        for i, index in enumerate(batch["index"].tolist()):
            height, width = batch["size"][i].tolist()
            # Class scores are resized (bilinear) and then decided: class indices are never interpolated.
            full = F.interpolate(logits[i : i + 1], size=(height, width), mode="bilinear", align_corners=False)
            key = data.prediction_key(index)
            values = self._write_png(key, self.predict(full)[0])
            if index < SAMPLE_IMAGES:
                self._write_overlay(data, index, values)
            row = {"image": data.describe(index), "mask": data.describe_mask(index), "prediction": key}
            rows.append({**row, **self._image_scores(predicted[i], batch["mask"][i])})
        return rows


class SegmentationTask:
    def load_data(
        self, job: ResolvedTrainingJob, roots: Mapping[str, Path], classes: tuple[str, ...] | None = None
    ) -> TaskData:  # masks hold indices, so model.numClasses alone fixes the classes: ``classes`` is not needed
        spec = job.spec
        num_classes = spec.model.num_classes
        if num_classes is None:
            raise InvalidInput("model.numClasses: segmentation needs it (masks do not list their classes)")
        labels, ignore = max(num_classes, 2), ignore_index(job)
        if ignore < labels:
            raise InvalidInput(f"data.ignoreIndex: {ignore} is a class index; it must be at least {labels}")
        sources = {"train": spec.data.train, "val": spec.data.val, "test": spec.data.test}
        read = partial(read_split, labels=labels, ignore_index=ignore, palette=palette_of(job, ignore))
        splits = {split: read(sources[split].format, root, split) for split, root in roots.items()}  # type: ignore[union-attr]
        if spec.data.val_split is not None and "train" in splits:
            splits["train"], splits["val"] = hold_out(splits["train"], spec.data.val_split, spec.seed)
        names = ("background", "foreground") if num_classes == 1 else tuple(str(k) for k in range(num_classes))
        return TaskData(splits=splits, num_classes=num_classes, class_names=names)

    def build_model(self, job: ResolvedTrainingJob, data: TaskData) -> nn.Module:
        return build_segmentation_model(job, data.num_classes)

    def transfer(self, job: ResolvedTrainingJob, model: nn.Module) -> Transfer | None:
        return encoder_transfer(job)

    def build_objective(self, job: ResolvedTrainingJob, data: TaskData) -> SegmentationObjective:
        return SegmentationObjective(job, data)

    def build_evaluator(self, job: ResolvedTrainingJob, data: TaskData, device: torch.device) -> SegmentationEvaluator:
        return SegmentationEvaluator(job, data, device)
