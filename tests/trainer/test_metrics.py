"""Metrics under DDP equal a single-process reference (scikit-learn) on the same predictions."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support, top_k_accuracy_score

from kiln.trainer.metrics import ClassificationMetrics, metrics_from_confusion

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


@pytest.mark.timeout(120)
def test_ddp_reduction_matches_single_process_reference(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.start_processes(_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True, start_method="fork")
    logits, targets = predictions()
    expected = reference(logits, targets)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert results[0]["metrics"] == results[1]["metrics"]  # every rank reports the same numbers
    for name, value in expected.items():
        assert results[0]["metrics"][name] == pytest.approx(value), name
    assert results[0]["metrics"]["loss"] == pytest.approx(1.0)
    full = confusion_matrix(targets.numpy(), logits.argmax(1).numpy(), labels=list(range(CLASSES)))
    assert results[0]["confusion"].long().tolist() == full.tolist()
