"""Metrics that stay correct under DDP: every rank accumulates counts, the counts are all-reduced (summed),
and only then are ratios taken. No per-rank average is ever averaged again.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Self

import torch

from kiln.trainer.distributed import all_reduce_sum


def class_scores(confusion: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each class's precision, recall, F1 (which is its Dice), IoU, support (true count), predicted count and
    ``present`` (it occurs as a true or a predicted label) from a confusion matrix (rows: true, columns:
    predicted). An undefined ratio (no predictions, no support) is 0, like scikit-learn's ``zero_division=0``.
    """
    confusion = confusion.double()
    true_positive = confusion.diag()
    support, predicted = confusion.sum(dim=1), confusion.sum(dim=0)
    union = support + predicted - true_positive
    # The true positives never exceed a denominator, so clamping an empty one to 1 gives exactly 0.
    return {
        "precision": true_positive / predicted.clamp(min=1),
        "recall": true_positive / support.clamp(min=1),
        "f1": 2 * true_positive / (support + predicted).clamp(min=1),
        "iou": true_positive / union.clamp(min=1),
        "support": support,
        "predicted": predicted,
        "present": union > 0,
    }


def _macro(values: torch.Tensor, present: torch.Tensor) -> float:
    return float(values[present].sum() / present.sum().clamp(min=1))


def metrics_from_confusion(confusion: torch.Tensor) -> dict[str, float]:
    """Accuracy and macro precision/recall/F1 from a confusion matrix (rows: true class, columns: predicted).

    Like scikit-learn with its default labels, the macro average runs over the classes that occur as a true
    or a predicted label; an undefined precision or recall (no predictions, no support) counts as 0.
    """
    scores = class_scores(confusion)
    present = scores["present"]
    return {
        "accuracy": float(confusion.double().diag().sum() / confusion.double().sum().clamp(min=1)),
        "precision": _macro(scores["precision"], present),
        "recall": _macro(scores["recall"], present),
        "f1": _macro(scores["f1"], present),
    }


def class_table(confusion: torch.Tensor, names: Sequence[str], columns: Mapping[str, str]) -> list[dict[str, Any]]:
    """One JSON-ready record per class, in index order: ``index``, ``name``, each of ``columns`` ({output name:
    key of ``class_scores``}), ``support`` and ``predicted`` counts. A class that occurs neither as a true nor as
    a predicted label has None for its scores: it is left out of the macro means, not scored 0."""
    scores = class_scores(confusion.cpu())  # one copy off the accelerator, not one per number
    table = []
    for k, present in enumerate(scores["present"].tolist()):
        record: dict[str, Any] = {"index": k, "name": names[k]}
        record.update({out: float(scores[key][k]) if present else None for out, key in columns.items()})
        record.update(support=int(scores["support"][k]), predicted=int(scores["predicted"][k]))
        table.append(record)
    return table


def confusion_lists(confusion: torch.Tensor) -> list[list[int]]:
    """The confusion matrix as JSON-ready integer rows (rows: true class, columns: predicted)."""
    return [[int(v) for v in row] for row in confusion.tolist()]


class ConfusionCounts:
    """A confusion matrix and a few running totals, kept as counts so that summing them over every rank
    (``reduce``, once) gives exactly the whole split's numbers; never an average of per-rank means."""

    def __init__(self, num_classes: int, totals: int, device: torch.device) -> None:
        self.num_classes = num_classes
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.float64, device=device)
        self.totals = torch.zeros(totals, dtype=torch.float64, device=device)
        self._reduced = False

    def reduce(self) -> Self:
        """Sum the counts over every rank (once); every rank then computes the same numbers."""
        if not self._reduced:
            flat = torch.cat([self.confusion.flatten(), self.totals])
            all_reduce_sum(flat)
            self.confusion = flat[: self.num_classes**2].view(self.num_classes, self.num_classes)
            self.totals = flat[self.num_classes**2 :]
            self._reduced = True
        return self


class ClassificationMetrics(ConfusionCounts):
    """Loss, top-1/top-5 accuracy, macro precision/recall/F1 and the confusion matrix, accumulated as counts."""

    def __init__(self, num_classes: int, device: torch.device) -> None:
        super().__init__(num_classes, 3, device)  # totals: [loss sum, sample count, top-k hits]
        self.top_k = min(5, num_classes)

    @torch.no_grad()
    def update(self, logits: torch.Tensor, targets: torch.Tensor, loss_sum: torch.Tensor | float = 0.0) -> None:
        predictions = logits.argmax(dim=1)
        index = targets * self.num_classes + predictions
        self.confusion += torch.bincount(index, minlength=self.num_classes**2).view_as(self.confusion)
        top_k = logits.topk(self.top_k, dim=1).indices
        hits = (top_k == targets[:, None]).any(dim=1).sum()
        self.totals += torch.stack(
            [
                torch.as_tensor(loss_sum, dtype=torch.float64, device=self.totals.device),
                torch.tensor(float(len(targets)), dtype=torch.float64, device=self.totals.device),
                hits.double(),
            ]
        )

    def compute(self) -> dict[str, float]:
        loss_sum, count, hits = self.totals.tolist()
        metrics = metrics_from_confusion(self.confusion)
        metrics["top5"] = hits / max(count, 1)
        metrics["loss"] = loss_sum / max(count, 1)
        return metrics


def segmentation_from_confusion(confusion: torch.Tensor) -> dict[str, float]:
    """mIoU, mean Dice and pixel accuracy from a pixel confusion matrix (rows: true class, columns: predicted).

    Like scikit-learn's ``jaccard_score(average="macro")`` with its default labels, the means run over the
    classes that occur as a true or a predicted label; ``iou/<k>`` is each class's IoU (0 when it never occurs).
    """
    scores = class_scores(confusion)
    present = scores["present"]
    metrics = {
        "miou": _macro(scores["iou"], present),
        "dice": _macro(scores["f1"], present),
        "pixel_accuracy": float(confusion.double().diag().sum() / confusion.double().sum().clamp(min=1)),
    }
    metrics.update({f"iou/{k}": float(v) for k, v in enumerate(scores["iou"].tolist())})
    return metrics


def pixel_confusion(predicted: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    """The confusion counts of one batch of masks, pixels marked ``ignore_index`` left out."""
    keep = target != ignore_index
    index = target[keep].long() * num_classes + predicted[keep].long()
    return torch.bincount(index, minlength=num_classes**2).view(num_classes, num_classes)


class SegmentationMetrics(ConfusionCounts):
    """Pixel confusion matrix and loss sum, all-reduced over every rank before mIoU, Dice and accuracy."""

    def __init__(self, num_classes: int, ignore_index: int, device: torch.device) -> None:
        super().__init__(num_classes, 2, device)  # totals: [loss sum, images]
        self.ignore_index = ignore_index

    @torch.no_grad()
    def update(self, predicted: torch.Tensor, target: torch.Tensor, loss_sum: torch.Tensor | float = 0.0) -> None:
        self.confusion += pixel_confusion(predicted, target, self.num_classes, self.ignore_index)
        count = torch.tensor(float(len(target)), dtype=torch.float64, device=self.totals.device)
        self.totals += torch.stack([torch.as_tensor(loss_sum, dtype=torch.float64, device=self.totals.device), count])

    def compute(self) -> dict[str, float]:
        loss_sum, count = self.totals.tolist()
        return {**segmentation_from_confusion(self.confusion), "loss": loss_sum / max(count, 1)}
