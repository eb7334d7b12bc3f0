"""The detection task: torchvision detectors on coco, yolo or voc data, their own loss dicts logged term by term,
COCO-exact mAP (``detection_metrics``), predictions as a COCO results JSON beside the split's COCO ground truth,
and pictures of the first images with their true and predicted boxes.

Images reach the network at 0..1, padded to a data.imageSize square with boxes in those pixels; the network
normalizes and batches them itself (its own transform, sized by ``detection_model.transform_args``). Everything
a person or the metric sees is mapped back to original pixels with the batch's ``scale``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kiln.api.resolve import ResolvedTrainingJob
from kiln.storage import Store, open_store
from kiln.trainer.augment import detection_eval_pipeline, detection_train_pipeline
from kiln.trainer.data import load_image
from kiln.trainer.history import RunLog
from kiln.trainer.registry import Registry
from kiln.trainer.tasks.base import Batch, LossInfo, Pipeline, SplitData, TaskData
from kiln.trainer.tasks.detection_data import DetectionSplit, detection_collate, hold_out, read_detection_split
from kiln.trainer.tasks.detection_metrics import METRICS, DetectionMetrics
from kiln.trainer.tasks.detection_model import build_detector, check_classes, from_detections, to_targets
from kiln.trainer.tasks.detection_outputs import json_bytes, result_rows, sample_png
from kiln.trainer.transfer import Transfer

FORMATS = ("coco", "yolo", "voc")
MODEL_LOSS = "model"  # the detector's own loss dict, summed
LOSSES: Registry[LossInfo] = Registry("detection loss")
# The network computes its losses itself (in training mode, given targets): the objective sums them, and this
# entry only names that sum for the catalogue and loss.weights.
LOSSES.register(LossInfo(MODEL_LOSS, lambda job, data: lambda outputs, batch: outputs, "the detector's own losses"))

# Pictures for the first images of each evaluated split, as for segmentation.
SAMPLE_IMAGES = 8


def term_name(key: str) -> str:
    """torchvision's loss keys as Kiln logs them: loss_classifier -> classifier, bbox_regression stays."""
    return key.removeprefix("loss_")


class DetectionObjective:
    """Training: the detector's loss dict, summed and weighted by loss.weights' model (moved by loss.schedule),
    each term kept for train/loss/<term>. Evaluation: detections with 0-based labels; no loss (torchvision's
    detectors compute losses only in training mode, which would also move BatchNorm statistics)."""

    def __init__(self, job: ResolvedTrainingJob) -> None:
        self._job = job
        self._weight = job.loss_weights[MODEL_LOSS]
        self._terms: dict[str, torch.Tensor] = {}

    def forward(self, model: nn.Module, batch: Batch, *, training: bool) -> Any:
        if training:
            return model(batch["image"], to_targets(batch["boxes"], batch["labels"]))
        return from_detections(model(batch["image"]))

    def loss(self, outputs: Any, batch: Batch) -> torch.Tensor:
        if not isinstance(outputs, Mapping):  # detections, from evaluation
            return torch.zeros((), device=batch["scale"].device)
        self._terms = {term_name(key): value.detach() for key, value in outputs.items()}
        return self._weight * torch.stack([value.float() for value in outputs.values()]).sum()

    def loss_terms(self) -> Mapping[str, torch.Tensor]:
        return self._terms

    def set_epoch(self, epoch: int) -> None:
        self._weight = self._job.loss_weights_at(epoch)[MODEL_LOSS]

    def loss_weights(self) -> Mapping[str, float]:
        return {MODEL_LOSS: self._weight} if self._job.spec.loss.schedule else {}


class DetectionEvaluator:
    """COCO mAP over the split against its own boxes in original pixels; per image, COCO result rows and, for
    the first SAMPLE_IMAGES images, a picture."""

    metric_names = METRICS

    def __init__(self, job: ResolvedTrainingJob, data: TaskData) -> None:
        self.class_names = data.class_names
        self.metrics = DetectionMetrics(data.class_names)
        self._job = job
        self._split = ""
        self._data: DetectionSplit | None = None
        self._store: Store | None = None
        self._last: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}  # the last batch, by index

    def begin(self, split: str, data: SplitData) -> None:
        if not isinstance(data, DetectionSplit):
            raise TypeError(f"detection evaluates DetectionSplit data, not {type(data).__name__}")
        self._split, self._data = split, data

    def _original(self, detection: dict[str, torch.Tensor], scale: torch.Tensor, index: int) -> dict[str, torch.Tensor]:
        """A detection in the split's original pixels: scaled by (h, w) ratios and clipped to the image (the
        padding the network saw lies outside it)."""
        boxes = detection["boxes"].float() * scale.flip(0).repeat(2).to(detection["boxes"].device)
        if self._data is not None:
            height, width = self._data.image_size(index)
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
        return {"boxes": boxes, "scores": detection["scores"].float(), "labels": detection["labels"]}

    def _truth(self, batch: Batch, i: int, index: int) -> dict[str, torch.Tensor]:
        if self._data is not None:  # the split's own boxes, exactly as gt-<split>.json has them
            boxes, labels = self._data.annotations(index)
            return {"boxes": torch.as_tensor(boxes, dtype=torch.float32), "labels": torch.as_tensor(labels)}
        scale = batch["scale"][i].flip(0).repeat(2)
        return {"boxes": batch["boxes"][i].float() * scale.to(batch["boxes"][i].device), "labels": batch["labels"][i]}

    def update(self, outputs: list[dict[str, torch.Tensor]], batch: Batch, loss: torch.Tensor) -> None:
        indices = batch["index"].tolist()
        predictions = [
            self._original(d, batch["scale"][i], index)
            for i, (d, index) in enumerate(zip(outputs, indices, strict=True))
        ]
        self.metrics.update(predictions, [self._truth(batch, i, index) for i, index in enumerate(indices)])
        self._last = {
            index: (p["boxes"].cpu().numpy(), p["scores"].cpu().numpy(), p["labels"].cpu().numpy())
            for index, p in zip(indices, predictions, strict=True)
        }

    def compute(self) -> dict[str, float]:
        return self.metrics.compute()

    def details(self) -> dict[str, Any]:
        """Per-class AP and AR and each class's precision at ten recall levels (IoU 0.5), for evaluation.json."""
        return self.metrics.details()

    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = open_store(self._job.run_uri, self._job.spec.storage)
        return self._store

    def prediction_rows(self, outputs: Any, batch: Batch, data: SplitData) -> list[dict[str, Any]]:
        """The COCO result rows of the batch ``update`` just saw (image ids are split index + 1, as in the
        ground truth); pictures of the split's first images."""
        if not isinstance(data, DetectionSplit):
            raise TypeError(f"detection predictions need DetectionSplit data, not {type(data).__name__}")
        rows = []
        for index in batch["index"].tolist():
            boxes, scores, labels = self._last[index]
            rows.extend(result_rows(index + 1, boxes, scores, labels))
            if index < SAMPLE_IMAGES:
                self._write_sample(data, index, (boxes, scores, labels))
        return rows

    def _write_sample(
        self, data: DetectionSplit, index: int, predicted: tuple[np.ndarray, np.ndarray, np.ndarray]
    ) -> None:
        """samples/<split>/<image path under the split>.png (the file name alone for an image outside it)."""
        name = Path(data.describe(index))
        name = Path(name.name) if name.is_absolute() else name
        image = load_image(data.images[index].path)
        png = sample_png(image, data.annotations(index), predicted, self.class_names)
        self.store.write_bytes(f"samples/{self._split}/{name.with_suffix('.png').as_posix()}", png)

    def write_predictions(self, split: str, rows: list[dict[str, Any]], run_log: RunLog) -> str:
        """predictions-<split>.json (COCO results, sorted by image) beside gt-<split>.json (COCO ground truth)."""
        if self._data is None:
            raise RuntimeError("write_predictions before begin: the split's ground truth is unknown")
        rows = sorted(rows, key=lambda row: (row["image_id"], -row["score"]))
        run_log.store.write_bytes(f"gt-{split}.json", json_bytes(self._data.coco_ground_truth()))
        key = f"predictions-{split}.json"
        run_log.store.write_bytes(key, json_bytes(rows))
        return run_log.url(key)


class DetectionTask:
    def load_data(
        self, job: ResolvedTrainingJob, roots: Mapping[str, Path], classes: tuple[str, ...] | None = None
    ) -> TaskData:
        spec = job.spec
        sources = {"train": spec.data.train, "val": spec.data.val, "test": spec.data.test}
        names = classes or (tuple(spec.model.class_names) if spec.model.class_names else None)
        splits: dict[str, DetectionSplit] = {}
        if "train" in roots:
            splits["train"] = read_detection_split(roots["train"], spec.data.train.format, split="train",
                                                   class_names=names)  # fmt: skip
            names = splits["train"].class_names
        assert names is not None, "without data.train the classes come from the evaluated checkpoint"
        check_classes(spec.model.num_classes, names)
        for split, root in roots.items():
            source = sources[split]
            if split != "train" and source is not None:
                splits[split] = read_detection_split(root, source.format, split=split, class_names=names)
        if spec.data.val_split is not None and "train" in splits:
            splits["train"], splits["val"] = hold_out(splits["train"], spec.data.val_split, spec.seed)
        return TaskData(splits=splits, num_classes=len(names), class_names=names)

    def build_model(self, job: ResolvedTrainingJob, data: TaskData) -> nn.Module:
        return build_detector(job, data.num_classes)

    def transfer(self, job: ResolvedTrainingJob, model: nn.Module) -> Transfer | None:
        return None  # the spec's transfer fields belong to classification and segmentation (refused here)

    def pipelines(
        self, job: ResolvedTrainingJob, mean: Sequence[float], std: Sequence[float]
    ) -> tuple[Pipeline, Pipeline]:
        """Box-aware pipelines to a padded 0..1 square; mean and std are the network's business (its transform)."""
        size = job.spec.data.image_size
        return detection_train_pipeline(job.spec.augmentation, size), detection_eval_pipeline(size)

    def collate(self, items: list[Batch]) -> Batch:
        return detection_collate(items)

    def build_objective(self, job: ResolvedTrainingJob, data: TaskData) -> DetectionObjective:
        return DetectionObjective(job)

    def build_evaluator(self, job: ResolvedTrainingJob, data: TaskData, device: torch.device) -> DetectionEvaluator:
        return DetectionEvaluator(job, data)
