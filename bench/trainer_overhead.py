"""Kiln's training-loop overhead: throughput of ``Trainer.train_epoch`` relative to a minimal PyTorch loop.

One process, one figure. Both loops train the same architecture (same init) on the same in-memory data (the
digits demo's training split, decoded and augmented once, so image decoding does not dilute the comparison)
with the same DataLoader (batch size, sampler, ``num_workers=0``), the same AdamW, fp32, and the same number
of optimizer steps per timed window. Nothing else runs inside Kiln's window: no validation, no checkpoint
(``everyEpochs`` is out of reach, ``everySteps`` is 0); what remains is Kiln's per-step bookkeeping (the
accumulation/AMP seam, the schedule, the all-reduced preemption flag, metrics and progress every 10 steps),
which is exactly the overhead being measured.

Method: short alternating windows of ``--steps`` optimizer steps each, in ABBA order (Kiln, plain, plain,
Kiln, ...) so that neither loop always runs second on a warmer cache, and each Kiln window is paired with the
plain window next to it. The first ``--warmup`` pairs are discarded. The figure is the median over pairs of
``kiln images/s / plain images/s`` (pairing cancels the machine's drift between pairs), with its IQR and
min/max; the 1-minute load average is sampled at every window, since other processes on a shared machine
move both numbers.

    .venv/bin/python bench/trainer_overhead.py [--model resnet10t] [--image-size 16] [--batch-size 32]
        [--threads 1] [--steps 40] [--pairs 30] [--warmup 3]

Prints one JSON line. Target: median ratio >= 0.97.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, RandomSampler

from kiln.api.parse import parse_manifest
from kiln.api.resolve import Environment, resolve
from kiln.trainer.demo import materialize
from kiln.trainer.distributed import World
from kiln.trainer.models import build_model
from kiln.trainer.progress import LatestSnapshot
from kiln.trainer.trainer import Trainer

SEED = 0
LR = 1e-3


class InMemory(Dataset[dict[str, Any]]):
    def __init__(self, source: Dataset[dict[str, Any]]) -> None:
        self.items = [source[i] for i in range(len(source))]  # type: ignore[arg-type]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.items[index]


def window_loader(dataset: Dataset[Any], batch_size: int, steps: int) -> DataLoader[Any]:
    """Exactly ``steps`` full batches, reshuffled on every pass: the one loader shape both loops iterate."""
    sampler = RandomSampler(dataset, num_samples=steps * batch_size, generator=torch.Generator().manual_seed(SEED))
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=0, drop_last=True)


def kiln_trainer(args: argparse.Namespace, data: Path, out: Path) -> Trainer:
    spec = {
        "task": "classification",
        "model": {"architecture": args.model},
        "data": {"train": {"uri": str(data / "train")}, "imageSize": args.image_size, "batchSize": args.batch_size,
                 "workers": 0},
        "augmentation": {"preset": "none"},
        "optimizer": {"name": "adamw", "lr": LR, "weightDecay": 0.0},
        "scheduler": {"name": "none"},
        "precision": "fp32",
        "seed": SEED,
        "epochs": 1,
        "checkpoint": {"everyEpochs": 1000, "everySteps": 0},
        "resources": {"gpusPerNode": 0, "procsPerNode": 1},
    }  # fmt: skip
    manifest = {"apiVersion": "kiln.dev/v1alpha1", "kind": "TrainingJob", "metadata": {"name": "bench"}, "spec": spec}
    job = resolve(parse_manifest(manifest), Environment(storage_root=str(out)), mode="local")
    # Rank 0 of a real run reports progress to the /progress server; keep that bookkeeping in the window.
    return Trainer(job, World(0, 1, 0, torch.device("cpu")), reporter=LatestSnapshot())


def plain_window(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader[Any]) -> None:
    model.train()
    for batch in loader:  # no scheduler: Kiln's "none" schedule still steps its LambdaLR, which is overhead
        logits = model(batch["image"])
        loss = F.cross_entropy(logits, batch["target"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def kiln_window(trainer: Trainer) -> None:
    trainer.batch = 0  # each window is a fresh pass over its loader, as an epoch would be
    assert trainer.train_epoch(), "not preempted"


def images_per_second(run: Callable[[], None], images: int) -> float:
    start = time.perf_counter()
    run()
    return images / (time.perf_counter() - start)


def quartiles(values: list[float]) -> tuple[float, float]:
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # The demo's own model and input size: what `make demo` actually trains.
    parser.add_argument("--model", default="resnet10t")
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 keeps windows steady)")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per window (a multiple of 10)")
    parser.add_argument("--pairs", type=int, default=30, help="Kiln/plain window pairs, warm-up included")
    parser.add_argument("--warmup", type=int, default=3, help="leading pairs not counted")
    args = parser.parse_args()
    os.environ.setdefault("KILN_METRICS_PORT", "0")
    # With both cores given to intra-op threads, every stray process stalls a window; one thread leaves the
    # other core for the rest of the machine and cuts the spread of paired ratios several times.
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = kiln_trainer(args, materialize(), Path(tmp))
        cached = InMemory(trainer.c.train_loader.dataset)
        trainer.c.train_loader = window_loader(cached, args.batch_size, args.steps)

        torch.manual_seed(SEED)
        model = build_model(trainer.spec.model, trainer.c.data.num_classes)
        model.load_state_dict(trainer.c.model.state_dict())  # the same starting point
        optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
        plain_loader = window_loader(cached, args.batch_size, args.steps)
        images = args.steps * args.batch_size

        ratios: list[float] = []
        kiln_rates: list[float] = []
        plain_rates: list[float] = []
        loads: list[float] = []
        for pair in range(args.pairs):
            runs = {"kiln": lambda: kiln_window(trainer), "plain": lambda: plain_window(model, optimizer, plain_loader)}
            order = ("kiln", "plain") if pair % 2 == 0 else ("plain", "kiln")  # ABBA: K P P K K P ...
            rate = {}
            for name in order:
                rate[name] = images_per_second(runs[name], images)
                loads.append(os.getloadavg()[0])
            if pair >= args.warmup:
                kiln_rates.append(rate["kiln"])
                plain_rates.append(rate["plain"])
                ratios.append(rate["kiln"] / rate["plain"])
        # Same work, checked: as many optimizer steps on each side (AdamW keeps a per-parameter step count).
        plain_steps = int(next(iter(optimizer.state.values()))["step"])
        assert trainer.step == plain_steps == args.pairs * args.steps, (trainer.step, plain_steps)
    q1, q3 = quartiles(ratios)
    result = {
        "model": args.model, "image_size": args.image_size, "batch_size": args.batch_size,
        "steps_per_window": args.steps, "pairs": len(ratios), "warmup_pairs": args.warmup,
        "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        "ratio_median": round(statistics.median(ratios), 3), "ratio_iqr": [round(q1, 3), round(q3, 3)],
        "ratio_min_max": [round(min(ratios), 3), round(max(ratios), 3)],
        "kiln_images_per_s_median": round(statistics.median(kiln_rates), 1),
        "plain_images_per_s_median": round(statistics.median(plain_rates), 1),
        "load_1min_min_mean_max": [round(min(loads), 2), round(statistics.mean(loads), 2), round(max(loads), 2)],
    }  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()
