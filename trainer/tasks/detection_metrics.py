"""COCO-exact detection metrics: torchmetrics' MeanAveragePrecision on the pycocotools backend, so the numbers
are COCOeval's own (mAP@0.5:0.95, @0.5, @0.75, by object size, AR@1/10/100, AP per class).

Under DDP every rank's per-image predictions and ground truth are gathered to every rank before COCOeval runs
once over the whole split: AP is a ranking over all detections, so per-rank numbers could not be combined, and
are never averaged. The gathering is Kiln's own (``all_gather_objects``): torchmetrics' sync gathers list states
one tensor at a time, which needs the same number of images on every rank, and evaluation shards need not have.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torchmetrics.detection import MeanAveragePrecision

from kiln.trainer.distributed import all_gather_objects

Image = dict[str, torch.Tensor]  # boxes [N, 4] xyxy in original pixels, labels [N] (0-based), scores [N]

# The keys of ``compute`` (the names a spec may watch), torchmetrics' names but for map50/map75.
METRICS = ("map", "map50", "map75", "map_small", "map_medium", "map_large", "mar_1", "mar_10", "mar_100")
_TORCHMETRICS_NAMES = {"map50": "map_50", "map75": "map_75"}
# COCOeval's own thresholds (pycocotools' Params), in float64. torchmetrics' defaults come from a float32
# torch.linspace (0.55 as 0.550000011920929): a recall or IoU that lands exactly on a threshold then falls on the
# other side of it, and the mAP drifts from COCOeval's by a few 1e-4.
IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10).tolist()
RECALL_THRESHOLDS = np.linspace(0.0, 1.0, 101).tolist()
# Recall levels at which evaluation.json summarizes each class's precision-recall curve (IoU 0.5, all areas,
# 100 detections per image): COCOeval keeps 101 points per class, more than a person reads.
PR_RECALLS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


class DetectionMetrics:
    """Per-image predictions and ground truth, kept on the CPU until ``compute`` runs COCOeval on all of them."""

    def __init__(self, class_names: Sequence[str]) -> None:
        self.class_names = tuple(class_names)
        self.predictions: list[Image] = []
        self.targets: list[Image] = []
        self._result: dict[str, Any] | None = None
        self._boxes = torch.zeros(0, dtype=torch.long)  # every ground-truth box's class, over every rank

    def update(self, predictions: Sequence[Image], targets: Sequence[Image]) -> None:
        self.predictions.extend(_on_cpu(p) for p in predictions)
        self.targets.extend(_on_cpu(t) for t in targets)

    def _evaluate(self) -> dict[str, Any]:
        """COCOeval over every rank's images (gathered once; every rank computes the same numbers)."""
        if self._result is None:
            parts = all_gather_objects((self.predictions, self.targets))
            predictions = [p for part, _ in parts for p in part]
            targets = [t for _, part in parts for t in part]
            self._boxes = torch.cat([t["labels"] for t in targets]) if targets else torch.zeros(0, dtype=torch.long)
            metric = MeanAveragePrecision(
                box_format="xyxy", iou_type="bbox", backend="pycocotools", class_metrics=True,
                extended_summary=True, sync_on_compute=False, iou_thresholds=IOU_THRESHOLDS,
                rec_thresholds=RECALL_THRESHOLDS,
            )  # fmt: skip
            metric.update(predictions, targets)
            self._result = {**metric.compute(), "images": len(targets)}
        return self._result

    def compute(self) -> dict[str, float]:
        result = self._evaluate()
        metrics = {name: float(result[_TORCHMETRICS_NAMES.get(name, name)]) for name in METRICS}
        # COCOeval says -1 where nothing defines the number (no object of that size): report 0 rather than a
        # negative AP in the status, evaluation.json keeps the per-class distinction.
        return {name: max(value, 0.0) for name, value in metrics.items()}

    def details(self) -> dict[str, Any]:
        """Per-class AP (0.5:0.95, 0.5, 0.75), AR@100, ground-truth box count and the precision at PR_RECALLS
        (IoU 0.5); a class without ground truth boxes has None for its scores (COCOeval leaves it out)."""
        result = self._evaluate()
        present = [int(k) for k in torch.atleast_1d(result["classes"]).tolist()]
        precision = result["precision"]  # [IoU thresholds, 101 recall points, classes, areas, max detections]
        boxes = self._boxes
        ap = torch.atleast_1d(result["map_per_class"]).tolist()
        ar = torch.atleast_1d(result["mar_100_per_class"]).tolist()
        table = []
        for k, name in enumerate(self.class_names):
            record: dict[str, Any] = {"index": k, "name": name, "boxes": int((boxes == k).sum())}
            column = present.index(k) if k in present else None
            if column is None or record["boxes"] == 0:
                record.update(ap=None, ap50=None, ap75=None, ar100=None, precisionAt50=None)
            else:
                curve = precision[:, :, column, 0, -1]  # every IoU threshold, all areas, 100 detections
                record.update(
                    ap=float(ap[column]),
                    ap50=_mean_defined(curve[0]),
                    ap75=_mean_defined(curve[5]),
                    ar100=float(ar[column]),
                    precisionAt50={f"{r:.1f}": round(float(curve[0][round(r * 100)]), 6) for r in PR_RECALLS},
                )
            table.append(record)
        return {"images": result["images"], "boxes": int(boxes.numel()), "classes": table}


def _on_cpu(image: Image) -> Image:
    """Boxes and scores as float32, labels as int64, on the CPU (COCOeval runs there)."""
    return {k: v.detach().cpu().long() if k == "labels" else v.detach().cpu().float() for k, v in image.items()}


def _mean_defined(values: torch.Tensor) -> float:
    """COCOeval's AP from one row of its precision array: the mean over recall points where it is defined."""
    defined = values[values > -1]
    return float(defined.mean()) if defined.numel() else 0.0
