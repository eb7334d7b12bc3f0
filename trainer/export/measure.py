"""Verification against eager PyTorch and latency measurement, the same for every runtime.

Verification runs in batches of a size other than the export's example batch, so a graph whose batch
dimension was frozen at export fails here instead of in production. Latency is wall time per call, input
already in host memory and output brought back to it, as a client calling the artifact sees it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kiln.api.status import LatencyMs
from kiln.trainer.export.formats import Runner

EXAMPLE_BATCH = 2
"""The batch size of the example input the graphs are traced with."""
VERIFY_BATCH = 3
"""Verification's batch size: any other than EXAMPLE_BATCH exercises the dynamic batch dimension."""


def run_batches(run: Runner, images: torch.Tensor, batch_size: int = VERIFY_BATCH) -> torch.Tensor:
    return torch.cat([run(images[start : start + batch_size]) for start in range(0, len(images), batch_size)])


@dataclass(frozen=True)
class Agreement:
    max_abs_diff: float
    top1: float | None


def compare(reference: torch.Tensor, outputs: torch.Tensor, predict: Callable[[torch.Tensor], torch.Tensor] | None
            ) -> Agreement:  # fmt: skip
    """The largest absolute difference (inf on a shape mismatch or a NaN), and with ``predict`` the share of
    predictions that agree."""
    if reference.shape != outputs.shape:
        return Agreement(math.inf, None)
    diff = float((reference - outputs).abs().max()) if reference.numel() else 0.0
    if math.isnan(diff):
        diff = math.inf
    top1 = float((predict(reference) == predict(outputs)).double().mean()) if predict is not None else None
    return Agreement(diff, top1)


@dataclass(frozen=True)
class Timing:
    latency: LatencyMs
    throughput: float


def time_runner(run: Runner, batch: torch.Tensor, iterations: int) -> Timing:
    """p50 and p95 over ``iterations`` timed calls after a few warm-up calls (allocators, lazy init, caches)."""
    for _ in range(max(2, min(10, iterations // 5))):
        run(batch)
    samples = []
    for _ in range(iterations):
        started = time.perf_counter()
        run(batch)
        samples.append((time.perf_counter() - started) * 1000)
    samples.sort()
    p50 = _percentile(samples, 0.50)
    return Timing(
        latency=LatencyMs(p50=round(p50, 4), p95=round(_percentile(samples, 0.95), 4)),
        throughput=round(len(batch) * 1000 / p50, 2) if p50 > 0 else 0.0,
    )


def _percentile(ordered: list[float], q: float) -> float:
    index = min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))
    return ordered[index]


def benchmark(run: Runner, shape: tuple[int, int, int], batch_sizes: list[int], iterations: int) -> dict[str, Timing]:
    generator = torch.Generator().manual_seed(0)
    return {str(size): time_runner(run, torch.randn((size, *shape), generator=generator), iterations)
            for size in batch_sizes}  # fmt: skip
