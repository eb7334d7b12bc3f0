"""The method the overhead benchmarks share: Kiln's ``Trainer.train_epoch`` against a minimal hand-written loop.

Both loops iterate the same in-memory data (decoded once, so decoding does not dilute the comparison) through
one loader shape (a seeded ``RandomSampler`` of exactly ``steps`` full batches, ``num_workers=0``) in short
timed windows. Windows alternate ABBA (Kiln, plain, plain, Kiln, ...) so that neither loop always runs second
on a warmer cache, and each Kiln window is paired with the plain window next to it. The first ``warmup`` pairs
are discarded. The figure is the median over pairs of ``kiln images/s / plain images/s`` (pairing cancels the
machine's drift between pairs), with its IQR and min/max; the 1-minute load average is sampled at every window,
since other processes on a shared machine move both numbers. The same ratio is also computed from the process's
CPU time per window (``cpu_ratio_*``): with one intra-op thread and nothing else running in the process, that is
the work each loop did, without the time the process spent descheduled; on a busy VM it is the steadier figure.
Minor page faults per step are counted for each loop too: both loops share one process, hence one malloc heap, and
when glibc returns freed memory to the kernel, the next allocations fault it back in page by page, which costs CPU
time that belongs to neither loop's code.

Used by ``trainer_overhead.py`` (classification), ``segmentation_overhead.py`` and ``detection_overhead.py``, which
each give ``kiln_against_plain`` a Trainer, a second instance of its network and the plain loop's loss; run those,
not this.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler

from kiln.api.parse import parse_manifest
from kiln.api.resolve import Environment, resolve
from kiln.trainer.distributed import World, unwrap
from kiln.trainer.progress import LatestSnapshot
from kiln.trainer.trainer import Trainer

SEED = 0
LR = 1e-3
# Nothing but the training loop in Kiln's window: no validation, and no checkpoint (everyEpochs out of reach,
# everySteps 0). What remains is Kiln's per-step bookkeeping, which is exactly the overhead being measured.
KILN_LOOP_ONLY: dict[str, Any] = {
    "augmentation": {"preset": "none"},  # augmented once would be augmented forever: the data is cached
    "optimizer": {"name": "adamw", "lr": LR, "weightDecay": 0.0},
    "scheduler": {"name": "none"},
    "precision": "fp32",
    "seed": SEED,
    "epochs": 1,
    "checkpoint": {"everyEpochs": 1000, "everySteps": 0},
    "resources": {"gpusPerNode": 0, "procsPerNode": 1},
}


class InMemory(Dataset[dict[str, Any]]):
    def __init__(self, source: Dataset[dict[str, Any]]) -> None:
        self.items = [source[i] for i in range(len(source))]  # type: ignore[arg-type]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.items[index]


def window_loader(
    dataset: Dataset[Any], batch_size: int, steps: int, collate: Callable[[list[Any]], Any] | None = None
) -> DataLoader[Any]:
    """Exactly ``steps`` full batches, reshuffled on every pass: the one loader shape both loops iterate (with the
    task's own collate where it has one: detection's batches are lists)."""
    sampler = RandomSampler(dataset, num_samples=steps * batch_size, generator=torch.Generator().manual_seed(SEED))
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=0, drop_last=True, collate_fn=collate
    )


def kiln_trainer(
    spec: dict[str, Any], out: Path, *, batch_size: int, steps: int, collate: Callable[[list[Any]], Any] | None = None
) -> Trainer:
    """A one-process CPU Trainer for ``spec`` (KILN_LOOP_ONLY applied), its training split decoded into memory
    and served by ``window_loader``."""
    manifest = {
        "apiVersion": "kiln.dev/v1alpha1", "kind": "TrainingJob", "metadata": {"name": "bench"},
        "spec": {**spec, **KILN_LOOP_ONLY, "data": {**spec["data"], "batchSize": batch_size, "workers": 0}},
    }  # fmt: skip
    job = resolve(parse_manifest(manifest), Environment(storage_root=str(out)), mode="local")
    # Rank 0 of a real run reports progress to the /progress server; keep that bookkeeping in the window.
    trainer = Trainer(job, World(0, 1, 0, torch.device("cpu")), reporter=LatestSnapshot())
    trainer.c.train_loader = window_loader(InMemory(trainer.c.train_loader.dataset), batch_size, steps, collate)
    return trainer


def kiln_window(trainer: Trainer) -> None:
    trainer.batch = 0  # each window is a fresh pass over its loader, as an epoch would be
    assert trainer.train_epoch(), "not preempted"


def images_per_second(run: Callable[[], None], images: int) -> tuple[float, float, int]:
    """(images per wall-clock second, images per second of this process's CPU time, minor page faults)."""
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return images / wall, images / cpu, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults


def quartiles(values: list[float]) -> tuple[float, float]:
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q3


def paired_windows(
    kiln: Callable[[], None], plain: Callable[[], None], *, images: int, steps: int, pairs: int, warmup: int
) -> dict[str, Any]:
    """Run ``pairs`` ABBA window pairs of ``steps`` steps and ``images`` images each; the summary of the pairs
    after ``warmup``."""
    ratios: list[float] = []
    cpu_ratios: list[float] = []
    kiln_rates: list[float] = []
    plain_rates: list[float] = []
    loads: list[float] = []
    faults: dict[str, list[int]] = {"kiln": [], "plain": []}
    runs = {"kiln": kiln, "plain": plain}
    for pair in range(pairs):
        order = ("kiln", "plain") if pair % 2 == 0 else ("plain", "kiln")  # ABBA: K P P K K P ...
        rate, cpu_rate, fault = {}, {}, {}
        for name in order:
            rate[name], cpu_rate[name], fault[name] = images_per_second(runs[name], images)
            loads.append(os.getloadavg()[0])
        if pair >= warmup:
            for name in runs:
                faults[name].append(fault[name])
            kiln_rates.append(rate["kiln"])
            plain_rates.append(rate["plain"])
            ratios.append(rate["kiln"] / rate["plain"])
            cpu_ratios.append(cpu_rate["kiln"] / cpu_rate["plain"])
    q1, q3 = quartiles(ratios)
    cpu_q1, cpu_q3 = quartiles(cpu_ratios)
    return {
        "pairs": len(ratios), "warmup_pairs": warmup, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        "ratio_median": round(statistics.median(ratios), 3), "ratio_iqr": [round(q1, 3), round(q3, 3)],
        "ratio_min_max": [round(min(ratios), 3), round(max(ratios), 3)],
        "kiln_images_per_s_median": round(statistics.median(kiln_rates), 1),
        "plain_images_per_s_median": round(statistics.median(plain_rates), 1),
        "cpu_ratio_median": round(statistics.median(cpu_ratios), 3),
        "cpu_ratio_iqr": [round(cpu_q1, 3), round(cpu_q3, 3)],
        "minor_faults_per_step_median": {name: round(statistics.median(f) / steps) for name, f in faults.items()},
        "load_1min_min_mean_max": [round(min(loads), 2), round(statistics.mean(loads), 2), round(max(loads), 2)],
    }  # fmt: skip


def optimizer_steps(optimizer: torch.optim.Optimizer) -> int:
    """Steps an Adam-family optimizer has taken (it keeps a per-parameter count): to check both did the same work."""
    return int(next(iter(optimizer.state.values()))["step"])


def add_window_arguments(parser: argparse.ArgumentParser, *, steps: int, pairs: int, warmup: int) -> None:
    """The options of the timed windows, with the benchmark's defaults."""
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 keeps windows steady)")
    parser.add_argument("--steps", type=int, default=steps, help="optimizer steps per window (a multiple of 10)")
    parser.add_argument("--pairs", type=int, default=pairs, help="Kiln/plain window pairs, warm-up included")
    parser.add_argument("--warmup", type=int, default=warmup, help="leading pairs not counted")


def set_up_process(args: argparse.Namespace) -> None:
    os.environ.setdefault("KILN_METRICS_PORT", "0")
    # With both cores given to intra-op threads, every stray process stalls a window; one thread leaves the
    # other core for the rest of the machine and cuts the spread of paired ratios several times.
    torch.set_num_threads(args.threads)


Loss = Callable[[dict[str, Any]], torch.Tensor]


def plain_window(model: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader[Any], loss_of: Loss) -> None:
    """The hand-written loop: ``loss_of(batch)`` (the task's forward and loss), zero_grad, backward, step."""
    model.train()
    for batch in loader:  # no scheduler: Kiln's "none" schedule still steps its LambdaLR, which is overhead
        loss = loss_of(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def kiln_against_plain(
    trainer: Trainer, model: nn.Module, loss_of: Loss, args: argparse.Namespace,
    collate: Callable[[list[Any]], Any] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """``paired_windows`` of Kiln's ``trainer`` against ``plain_window`` on ``model`` (another instance of the same
    network, given Kiln's weights here: the same starting point), the same AdamW and the same data; asserts that
    both took the same number of optimizer steps."""
    model.load_state_dict(unwrap(trainer.c.model).state_dict())
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    plain_loader = window_loader(trainer.c.train_loader.dataset, args.batch_size, args.steps, collate)
    stats = paired_windows(
        lambda: kiln_window(trainer), lambda: plain_window(model, optimizer, plain_loader, loss_of),
        images=args.steps * args.batch_size, steps=args.steps, pairs=args.pairs, warmup=args.warmup,
    )  # fmt: skip
    plain_steps = optimizer_steps(optimizer)
    assert trainer.step == plain_steps == args.pairs * args.steps, (trainer.step, plain_steps)
    return stats
