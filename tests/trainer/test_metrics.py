"""Metrics under DDP equal a single-process reference (scikit-learn) on the same predictions."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    jaccard_score,
    precision_recall_fscore_support,
    top_k_accuracy_score,
)
from trainer_testkit import assert_per_class_matches_scikit_learn

from kiln.trainer.metrics import ClassificationMetrics, SegmentationMetrics, class_table, metrics_from_confusion

CLASSES = 6


def predictions(n: int = 101, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and targets; class 5 is never predicted and class 4 never occurs, to exercise the edges."""
    generator = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, 4, (n,), generator=generator)
    targets[::7] = 5
    logits = torch.randn(n, CLASSES, generator=generator)
    logits[:, 5] -= 10
    logits[torch.arange(n), targets] += torch.rand(n, generator=generator) * 2  # mostly right
    return logits, targets


def reference(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    y, p = targets.numpy(), logits.argmax(1).numpy()
    precision, recall, f1, _ = precision_recall_fscore_support(y, p, average="macro", zero_division=0)
    return {
        "accuracy": accuracy_score(y, p),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "top5": top_k_accuracy_score(y, logits.numpy(), k=5, labels=np.arange(CLASSES)),
    }


def test_single_process_matches_scikit_learn() -> None:
    logits, targets = predictions()
    metrics = ClassificationMetrics(CLASSES, torch.device("cpu"))
    metrics.update(logits, targets)
    computed = metrics.compute()
    for name, value in reference(logits, targets).items():
        assert computed[name] == pytest.approx(value), name
    expected = confusion_matrix(targets.numpy(), logits.argmax(1).numpy(), labels=list(range(CLASSES)))
    assert metrics.confusion.long().tolist() == expected.tolist()


def test_empty_confusion_is_zero_not_nan() -> None:
    assert metrics_from_confusion(torch.zeros(3, 3)) == {"accuracy": 0.0, "precision": 0.0, "recall": 0.0, "f1": 0.0}


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    logits, targets = predictions()
    # Uneven shards, in small uneven batches: the per-rank averages differ from the global ones.
    shard = slice(0, 70) if rank == 0 else slice(70, None)
    metrics = ClassificationMetrics(CLASSES, torch.device("cpu"))
    for start in range(0, len(targets[shard]), 9):
        part = slice(start, start + 9)
        metrics.update(logits[shard][part], targets[shard][part], loss_sum=float(len(targets[shard][part])))
    computed = metrics.reduce().compute()
    torch.save({"metrics": computed, "confusion": metrics.confusion}, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def run_two_ranks(worker: Callable[[int, int, int, str], None], out: Path) -> None:
    """``worker(rank, 2, port, out)`` in two forked processes joined by a gloo process group on a free port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.start_processes(worker, args=(2, port, str(out)), nprocs=2, join=True, start_method="fork")


@pytest.mark.timeout(120)
def test_ddp_reduction_matches_single_process_reference(tmp_path: Path) -> None:
    run_two_ranks(_worker, tmp_path)
    logits, targets = predictions()
    expected = reference(logits, targets)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert results[0]["metrics"] == results[1]["metrics"]  # every rank reports the same numbers
    for name, value in expected.items():
        assert results[0]["metrics"][name] == pytest.approx(value), name
    assert results[0]["metrics"]["loss"] == pytest.approx(1.0)
    full = confusion_matrix(targets.numpy(), logits.argmax(1).numpy(), labels=list(range(CLASSES)))
    assert results[0]["confusion"].long().tolist() == full.tolist()


# -- per-class numbers from counts summed over two ranks ---------------------------------------------------------

SEG_CLASSES, IGNORE = 6, 255
SEG_COLUMNS = {"iou": "iou", "dice": "f1", "precision": "precision", "recall": "recall"}
CLS_COLUMNS = {"precision": "precision", "recall": "recall", "f1": "f1"}


def mask_shards() -> list[tuple[np.ndarray, np.ndarray]]:
    """(predicted, true) masks for two ranks, unlike on purpose so that averaging each rank's scores would not
    give the split's: rank 0 holds 2 images, mostly class 0, mostly right; rank 1 holds 5, mostly classes 1-3,
    often wrong. Class 4 is only ever predicted, class 5 occurs nowhere; some pixels are ignored."""
    rng = np.random.default_rng(7)
    shards = []
    for images, weights, right in ((2, [0.85, 0.05, 0.05, 0.05], 0.9), (5, [0.1, 0.3, 0.3, 0.3], 0.45)):
        true = rng.choice(4, size=(images, 9, 11), p=weights)
        noise = rng.choice(5, size=true.shape)
        predicted = np.where(rng.random(true.shape) < right, true, noise)
        true[rng.random(true.shape) < 0.1] = IGNORE
        shards.append((predicted, true))
    return shards


def label_shards() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(logits, targets) for two ranks, 70 and 31 samples, from ``predictions()``."""
    logits, targets = predictions()
    return [(logits[:70], targets[:70]), (logits[70:], targets[70:])]


def _shard_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    predicted, true = mask_shards()[rank]
    segmentation = SegmentationMetrics(SEG_CLASSES, IGNORE, torch.device("cpu"))
    for i in range(len(true)):  # one image per batch, like uneven last batches
        segmentation.update(torch.from_numpy(predicted[i : i + 1]), torch.from_numpy(true[i : i + 1]), 0.5)
    logits, targets = label_shards()[rank]
    classification = ClassificationMetrics(CLASSES, torch.device("cpu"))
    classification.update(logits, targets)
    names = [f"c{k}" for k in range(SEG_CLASSES)]
    result = {
        "segmentation": segmentation.reduce().compute(),
        "segmentation_classes": class_table(segmentation.confusion, names, SEG_COLUMNS),
        "segmentation_confusion": segmentation.confusion.long().tolist(),
        "classification": classification.reduce().compute(),
        "classification_classes": class_table(classification.confusion, names[:CLASSES], CLS_COLUMNS),
    }
    torch.save(result, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_two_ranks_sum_counts_to_scikit_learns_numbers_per_class(tmp_path: Path) -> None:
    run_two_ranks(_shard_worker, tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert ranks[0] == ranks[1]  # every rank reports the same numbers
    got = ranks[0]

    shards = mask_shards()
    keep = [true != IGNORE for _, true in shards]
    y_true = np.concatenate([true[k] for (_, true), k in zip(shards, keep, strict=True)])
    y_pred = np.concatenate([pred[k] for (pred, _), k in zip(shards, keep, strict=True)])
    seg = got["segmentation"]
    assert seg["miou"] == pytest.approx(jaccard_score(y_true, y_pred, average="macro"), abs=1e-6)
    assert seg["dice"] == pytest.approx(f1_score(y_true, y_pred, average="macro"), abs=1e-6)
    assert seg["pixel_accuracy"] == pytest.approx(accuracy_score(y_true, y_pred), abs=1e-6)
    assert seg["loss"] == pytest.approx(0.5 / 1)  # a loss sum of 0.5 per image: the mean is 0.5 per image
    assert got["segmentation_confusion"] == confusion_matrix(y_true, y_pred, labels=range(SEG_CLASSES)).tolist()
    assert_per_class_matches_scikit_learn(got["segmentation_classes"], y_true, y_pred, SEG_CLASSES)
    assert got["segmentation_classes"][5]["iou"] is None and got["segmentation_classes"][4]["iou"] == 0.0
    # The shards are unlike enough that averaging each rank's own scores would be caught above.
    per_rank = [jaccard_score(t[t != IGNORE], p[t != IGNORE], average="macro") for p, t in shards]
    assert abs(np.mean(per_rank) - seg["miou"]) > 0.05

    logits, targets = predictions()
    y, p = targets.numpy(), logits.argmax(1).numpy()
    assert got["classification"]["accuracy"] == pytest.approx(accuracy_score(y, p), abs=1e-6)
    assert got["classification"]["f1"] == pytest.approx(f1_score(y, p, average="macro", zero_division=0), abs=1e-6)
    assert_per_class_matches_scikit_learn(got["classification_classes"], y, p, CLASSES)
    per_rank_accuracy = [accuracy_score(t.numpy(), lg.argmax(1).numpy()) for lg, t in label_shards()]
    assert abs(np.mean(per_rank_accuracy) - accuracy_score(y, p)) > 0.005
