"""Kiln's training throughput against a minimal hand-written PyTorch loop, in one process, one run.

Both loops train the same model (same init), on the same data (the digits demo's training split, decoded
once into memory so image decoding does not dilute the comparison), with the same batch size, optimizer
and precision. They alternate epoch by epoch (Kiln, plain, Kiln, plain, ...) so drift in the machine's
speed hits both alike; the first epoch of each is a warm-up and is not counted.

    .venv/bin/python bench/trainer_overhead.py [--model debug_small] [--image-size 32] [--batch-size 64]

Prints the median images/s of each and the median of the per-epoch ratios Kiln / plain (target >= 0.97).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from kiln.trainer.demo import materialize
from kiln.trainer.distributed import init_distributed
from kiln.trainer.models import build_model
from kiln.trainer.trainer import Trainer
from torch.utils.data import DataLoader, Dataset

from kiln.api.manifest import parse_manifest
from kiln.api.resolve import Environment, resolve


class InMemory(Dataset[dict[str, Any]]):
    def __init__(self, source: Dataset[dict[str, Any]]) -> None:
        self.items = [source[i] for i in range(len(source))]  # type: ignore[arg-type]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.items[index]


def kiln_trainer(args: argparse.Namespace, data: Path, out: Path) -> Trainer:
    spec = {
        "task": "classification",
        "model": {"architecture": args.model},
        "data": {"train": {"uri": str(data / "train")}, "imageSize": args.image_size, "batchSize": args.batch_size,
                 "workers": 0},
        "augmentation": {"preset": "none"},
        "optimizer": {"name": "adamw", "lr": 1e-3, "weightDecay": 0.0},
        "scheduler": {"name": "none"},
        "epochs": args.epochs,
        "checkpoint": {"everyEpochs": 1000},
        "resources": {"gpusPerNode": 0, "procsPerNode": 1},
    }  # fmt: skip
    manifest = {"apiVersion": "kiln.dev/v1alpha1", "kind": "TrainingJob", "metadata": {"name": "bench"}, "spec": spec}
    job = resolve(parse_manifest(manifest), Environment(storage_root=str(out)), mode="local")
    torch.manual_seed(0)
    return Trainer(job, init_distributed())


def plain_epoch(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader[Any]) -> None:
    model.train()
    for batch in loader:
        logits = model(batch["image"])
        loss = F.cross_entropy(logits, batch["target"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def timed(fn: Any, images: int) -> float:
    start = time.perf_counter()
    fn()
    return images / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="debug_small")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=6, help="epochs per loop, the first one a warm-up")
    args = parser.parse_args()
    os.environ.setdefault("KILN_METRICS_PORT", "0")
    with tempfile.TemporaryDirectory() as tmp:
        trainer = kiln_trainer(args, materialize(), Path(tmp))
        c = trainer.c
        cached = InMemory(c.train_loader.dataset)
        c.train_loader = DataLoader(cached, batch_size=args.batch_size, sampler=c.train_sampler)
        images = len(cached)

        torch.manual_seed(0)
        model = build_model(trainer.spec.model, c.data.num_classes)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
        plain_loader = DataLoader(cached, batch_size=args.batch_size, shuffle=True)

        kiln_rates, plain_rates = [], []
        for epoch in range(args.epochs):
            trainer.epoch, trainer.batch = epoch, 0
            first, second = (trainer.train_epoch, lambda: plain_epoch(model, optimizer, plain_loader))
            if epoch % 2:  # alternate which loop goes first, so neither always runs on a warmer cache
                kiln_rate = timed(first, images)
                plain_rate = timed(second, images)
            else:
                plain_rate = timed(second, images)
                kiln_rate = timed(first, images)
            if epoch > 0:
                kiln_rates.append(kiln_rate)
                plain_rates.append(plain_rate)
    kiln, plain = statistics.median(kiln_rates), statistics.median(plain_rates)
    # The ratio of each adjacent pair, then the median: robust to the machine's speed drifting mid-run.
    pair_ratio = statistics.median(k / p for k, p in zip(kiln_rates, plain_rates, strict=True))
    result = {
        "model": args.model, "image_size": args.image_size, "batch_size": args.batch_size, "images": images,
        "threads": torch.get_num_threads(), "kiln_images_per_s": round(kiln, 1), "plain_images_per_s": round(plain, 1),
        "ratio": round(pair_ratio, 3), "ratio_of_medians": round(kiln / plain, 3),
    }  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()
