"""The classification task: timm classifiers, cross-entropy with mixup/cutmix and label smoothing,
top-1/top-5/macro-F1 metrics and per-image predictions."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from timm.data import Mixup
from torch import nn

from kiln.api.resolve import ResolvedTrainingJob
from kiln.trainer.class_stats import auto_class_weights
from kiln.trainer.errors import InvalidInput
from kiln.trainer.metrics import ClassificationMetrics, class_table, confusion_lists
from kiln.trainer.models import build_model, classifier_paths
from kiln.trainer.registry import Registry
from kiln.trainer.tasks.base import Batch, LossInfo, SplitData, TaskData, weighted_loss
from kiln.trainer.tasks.classification_data import FORMATS, LabelledImages, class_order, hold_out, index_samples
from kiln.trainer.transfer import PretrainedPart, Transfer


def _cross_entropy(job: ResolvedTrainingJob, data: TaskData) -> Callable[[Any, Batch], torch.Tensor]:
    class_weights = job.spec.loss.class_weights
    if class_weights == "auto":
        class_weights = auto_class_weights(data.class_stats)
    elif class_weights is not None and len(class_weights) != data.num_classes:
        raise InvalidInput(f"loss.classWeights has {len(class_weights)} entries for {data.num_classes} classes")
    weight = torch.tensor(class_weights) if class_weights else None
    smoothing = job.spec.augmentation.label_smoothing

    def loss(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        target = batch["target"]
        w = weight.to(logits.device) if weight is not None else None
        # Soft (mixed) targets already carry the smoothing; hard ones get it here.
        return F.cross_entropy(
            logits.float(), target, weight=w, label_smoothing=smoothing if target.dim() == 1 else 0.0
        )

    return loss


LOSSES: Registry[LossInfo] = Registry("classification loss")
LOSSES.register(LossInfo("cross_entropy", _cross_entropy, "cross-entropy, with label smoothing and class weights"))


class ClassificationObjective:
    def __init__(self, job: ResolvedTrainingJob, data: TaskData) -> None:
        aug = job.spec.augmentation
        self.mixup = (
            Mixup(
                mixup_alpha=aug.mixup,
                cutmix_alpha=aug.cutmix,
                label_smoothing=aug.label_smoothing,
                num_classes=data.num_classes,
            )
            if aug.mixup > 0 or aug.cutmix > 0
            else None
        )
        self._loss = weighted_loss(LOSSES, job, data)

    def forward(self, model: nn.Module, batch: Batch, *, training: bool) -> torch.Tensor:
        # The spec guarantees an even batchSize and the loader drops the last partial batch, so every batch
        # can be mixed: timm's Mixup pairs image i with image n-1-i.
        if training and self.mixup is not None:
            batch["image"], batch["target"] = self.mixup(batch["image"], batch["target"])
        return model(batch["image"])

    def loss(self, outputs: torch.Tensor, batch: Batch) -> torch.Tensor:
        return self._loss(outputs, batch)

    def loss_terms(self) -> Mapping[str, torch.Tensor]:
        return self._loss.terms

    def set_epoch(self, epoch: int) -> None:
        self._loss.set_epoch(epoch)

    def loss_weights(self) -> Mapping[str, float]:
        return self._loss.scheduled_weights()


class ClassificationEvaluator:
    metric_names = ("accuracy", "precision", "recall", "f1", "top5", "loss")

    def __init__(self, data: TaskData, device: torch.device) -> None:
        self.class_names = data.class_names
        self.metrics = ClassificationMetrics(data.num_classes, device)

    def update(self, outputs: torch.Tensor, batch: Batch, loss: torch.Tensor) -> None:
        self.metrics.update(outputs.float(), batch["target"], loss.detach().double() * len(batch["target"]))

    def compute(self) -> dict[str, float]:
        return self.metrics.reduce().compute()

    def details(self) -> dict[str, Any]:
        """Per-class precision, recall, F1 and support (images) and the confusion matrix, for evaluation.json."""
        confusion = self.metrics.reduce().confusion
        columns = {"precision": "precision", "recall": "recall", "f1": "f1"}
        return {
            "images": int(self.metrics.totals[1]),
            "classes": class_table(confusion, self.class_names, columns),
            "confusion": confusion_lists(confusion),
        }

    def prediction_rows(self, outputs: torch.Tensor, batch: Batch, data: SplitData) -> list[dict[str, Any]]:
        probabilities = outputs.float().softmax(dim=1)
        confidence, predicted = probabilities.max(dim=1)
        rows = []
        for index, label, pred, conf in zip(
            batch["index"].tolist(), batch["target"].tolist(), predicted.tolist(), confidence.tolist(), strict=True
        ):
            rows.append(
                {
                    "path": data.describe(index),
                    "label": self.class_names[label],
                    "prediction": self.class_names[pred],
                    "confidence": round(conf, 6),
                    "correct": int(label == pred),
                }
            )
        return rows


class ClassificationTask:
    def load_data(
        self, job: ResolvedTrainingJob, roots: Mapping[str, Path], classes: tuple[str, ...] | None = None
    ) -> TaskData:
        spec = job.spec
        sources = {"train": spec.data.train, "val": spec.data.val, "test": spec.data.test}
        raw = {split: FORMATS.get(sources[split].format).read(root, split) for split, root in roots.items()}  # type: ignore[union-attr]
        order = list(classes) if classes else class_order({name for _, name in raw["train"]})
        declared = spec.model.num_classes
        if declared is not None and declared != len(order):
            shown = ", ".join(order[:10]) + (", ..." if len(order) > 10 else "")
            raise InvalidInput(f"model.numClasses is {declared} but data.train has {len(order)} classes ({shown})")
        splits: dict[str, LabelledImages] = {
            split: index_samples(samples, order, roots[split], split) for split, samples in raw.items()
        }
        if spec.data.val_split is not None and "train" in splits:
            splits["train"], splits["val"] = hold_out(splits["train"], spec.data.val_split, spec.seed)
        return TaskData(splits=splits, num_classes=len(order), class_names=tuple(order))

    def build_model(self, job: ResolvedTrainingJob, data: TaskData) -> nn.Module:
        return build_model(job.spec.model, data.num_classes, job.spec.storage)

    def transfer(self, job: ResolvedTrainingJob, model: nn.Module) -> Transfer | None:
        """The backbone: everything but the classifier head that timm's metadata names."""
        spec = job.spec.model
        if spec.freeze_backbone is None and spec.backbone_lr_scale is None:
            return None
        field = "model.freezeBackbone" if spec.freeze_backbone is not None else "model.backboneLrScale"
        heads = classifier_paths(model)
        if not heads:
            raise InvalidInput(
                f"{field}: the network names no classifier head (pretrained_cfg['classifier'] or get_classifier()), "
                "so its backbone is unknown"
            )
        return Transfer(
            PretrainedPart("backbone", exclude=heads),
            field,
            freeze_epochs=spec.freeze_backbone.epochs if spec.freeze_backbone is not None else 0,
            lr_scale=spec.backbone_lr_scale,
        )

    def build_objective(self, job: ResolvedTrainingJob, data: TaskData) -> ClassificationObjective:
        return ClassificationObjective(job, data)

    def build_evaluator(
        self, job: ResolvedTrainingJob, data: TaskData, device: torch.device
    ) -> ClassificationEvaluator:
        return ClassificationEvaluator(data, device)
