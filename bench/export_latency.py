"""The exporter's ONNX artifacts in an onnxruntime CPU session against eager PyTorch: latency per call at batch 1
and 32, fp32 and static int8 (QDQ), for two models.

- ``digits``: the demo's classifier, the best checkpoint ``make demo`` wrote (timm resnet10t, 16 px, 10 classes),
  read by the exporter's ``load_source``; static int8 is calibrated on the demo's validation images, found the way
  the exporter finds them (``input_source``).
- ``resnet50``: timm resnet50 with random weights at 224 px, a resnet50-class deployment. There is no data, so it
  is calibrated on random inputs: what calibration finds changes the int8 model's outputs, not its cost.

The artifacts come from the exporter's own code: one ``Graph`` through ``FORMATS["onnx"].export`` (the dynamo
exporter, dynamic batch, the default opset) and ``quantize(..., "static", ...)`` (``quant_pre_process``, QDQ,
per-channel weights, ``reduce_range`` on x86 without VNNI). Eager PyTorch is the exporter's ``torch_runner``
(``inference_mode``) on the same network. Both runtimes get ``--threads`` intra-op threads, so they compete on the
same resources; the exporter's own ``load_onnx`` leaves onnxruntime its default of one thread per physical core.
Before timing, ``measure.compare`` checks that each artifact computes what the network does (max abs diff, top-1
agreement with eager on the timed inputs).

Method (bench/overhead.py's, for three runners): per batch size, every runner is warmed up, then ``rounds``
rounds run; in each, every runner runs one window of ``calls`` calls on the same input, in an order that cycles
through all six permutations so that none always runs first or last. A window's figure is its median wall time
per call; each round gives the ratios onnxruntime / eager, int8 / fp32 and int8 / eager, and the first ``warmup``
rounds are discarded. Reported: the median of each ratio over rounds, its IQR and min/max, the same ratio in
process CPU time (with one thread per runtime, the work done, without the time spent descheduled), the median
latencies, and the 1-minute load average at every window. Window sizes (``PLANS``) keep resnet50 at batch 32,
about 15 s per eager call on one core, to a few calls.

    .venv/bin/python bench/export_latency.py [--models digits resnet50] [--threads 1]
        [--checkpoint .kiln/local/digits/checkpoints]

Prints one JSON line per model and batch size. Target (issue 11): onnxruntime <= 0.7x eager latency at batch 1.
Exit 2 with one line when the digits checkpoint is missing (run ``make demo`` first).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnxruntime as ort
import timm
import torch
from overhead import quartiles
from torch import nn

from kiln.api.export import OnnxOptions
from kiln.trainer.demo import ROOT, RUN
from kiln.trainer.export.formats import FORMATS, Graph, Runner, torch_runner
from kiln.trainer.export.inputs import InputSource, Shape, input_source
from kiln.trainer.export.measure import EXAMPLE_BATCH, compare, run_batches
from kiln.trainer.export.quantize import quantize
from kiln.trainer.export.source import load_source


@dataclass(frozen=True)
class Plan:
    calls: int
    """Calls per window."""
    rounds: int
    warmup: int
    """Leading rounds not counted."""


PLANS: dict[str, dict[int, Plan]] = {
    "digits": {1: Plan(calls=50, rounds=14, warmup=2), 32: Plan(calls=20, rounds=14, warmup=2)},
    # Eager resnet50 on one core: about 0.3 s per call at batch 1 and 15 s at batch 32.
    "resnet50": {1: Plan(calls=3, rounds=8, warmup=1), 32: Plan(calls=1, rounds=4, warmup=1)},
}
CALIBRATION_SAMPLES = {"digits": 64, "resnet50": 16}  # digits: quantize.calibrationSamples' default
RUNNERS = ("eager", "onnx", "int8")
RATIOS = {  # name: (numerator, denominator)
    "onnx_over_eager": ("onnx", "eager"),
    "int8_over_onnx": ("int8", "onnx"),
    "int8_over_eager": ("int8", "eager"),
}


@dataclass
class Subject:
    name: str
    module: nn.Module
    shape: Shape
    inputs: InputSource


def digits(checkpoint: Path) -> Subject:
    source = load_source(str(checkpoint), None)
    size = source.job.spec.data.image_size
    shape = (3, size, size)
    module = source.task.graph(source.network).eval()
    return Subject(f"digits ({source.job.spec.model.architecture}, {size} px)", module, shape,
                   input_source(source, shape))  # fmt: skip


def resnet50() -> Subject:
    torch.manual_seed(0)
    module = timm.create_model("resnet50", pretrained=False).eval()
    shape = (3, 224, 224)
    return Subject("resnet50 (timm, random weights, 224 px)", module, shape,
                   InputSource("random", "random inputs: no data", shape))  # fmt: skip


def onnx_runner(path: Path, threads: int) -> Runner:
    """The exporter's ONNX runner (numpy in, a float tensor out), with the thread count eager PyTorch has."""
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run(batch: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {name: batch.numpy()})[0]).float()

    return run


def build_runners(subject: Subject, key: str, workdir: Path, threads: int) -> dict[str, Runner]:
    example = torch.randn(EXAMPLE_BATCH, *subject.shape)
    graph = Graph(subject.module, example, "logits", OnnxOptions().opset)
    fp32 = workdir / f"{key}.onnx"
    exported = FORMATS.get("onnx").export(graph, fp32)
    assert exported.exporter == "dynamo", exported.fallback_reason
    samples = subject.inputs.available(CALIBRATION_SAMPLES[key])
    int8 = quantize(fp32, workdir / f"{key}.int8-static.onnx", "static", subject.inputs, samples)
    return {
        "eager": torch_runner(subject.module, torch.device("cpu")),
        "onnx": onnx_runner(fp32, threads),
        "int8": onnx_runner(int8, threads),
    }


def agreement(subject: Subject, runners: dict[str, Runner], batch: torch.Tensor) -> dict[str, Any]:
    reference = run_batches(runners["eager"], batch, len(batch))
    found = {}
    for name in ("onnx", "int8"):
        result = compare(reference, run_batches(runners[name], batch, len(batch)), lambda out: out.argmax(dim=1))
        found[name] = {"max_abs_diff": float(f"{result.max_abs_diff:.3g}"), "top1_agreement": result.top1}
    return found


def window(run: Runner, batch: torch.Tensor, calls: int) -> tuple[float, float]:
    """(median wall ms per call, process CPU ms per call) over ``calls`` calls."""
    walls = []
    cpu = time.process_time()
    for _ in range(calls):
        started = time.perf_counter()
        run(batch)
        walls.append((time.perf_counter() - started) * 1000)
    return statistics.median(walls), (time.process_time() - cpu) * 1000 / calls


def summary(values: list[float]) -> dict[str, Any]:
    q1, q3 = quartiles(values)
    return {"median": round(statistics.median(values), 3), "iqr": [round(q1, 3), round(q3, 3)],
            "min_max": [round(min(values), 3), round(max(values), 3)]}  # fmt: skip


def interleaved(runners: dict[str, Runner], batch: torch.Tensor, plan: Plan) -> dict[str, Any]:
    for run in runners.values():  # allocators, lazy initialization, onnxruntime's first-run planning
        window(run, batch, min(plan.calls, 3))
    orders = list(itertools.permutations(RUNNERS))
    wall: dict[str, list[float]] = {name: [] for name in RUNNERS}
    cpu: dict[str, list[float]] = {name: [] for name in RUNNERS}
    loads = []
    for index in range(plan.rounds):
        measured = {}
        for name in orders[index % len(orders)]:
            measured[name] = window(runners[name], batch, plan.calls)
            loads.append(os.getloadavg()[0])
        if index >= plan.warmup:
            for name, (wall_ms, cpu_ms) in measured.items():
                wall[name].append(wall_ms)
                cpu[name].append(cpu_ms)

    def ratios(times: dict[str, list[float]], top: str, bottom: str) -> list[float]:
        return [a / b for a, b in zip(times[top], times[bottom], strict=True)]

    return {
        "rounds": plan.rounds - plan.warmup, "warmup_rounds": plan.warmup, "calls_per_window": plan.calls,
        **{key: summary(ratios(wall, *pair)) for key, pair in RATIOS.items()},
        **{f"cpu_{key}_median": round(statistics.median(ratios(cpu, *pair)), 3) for key, pair in RATIOS.items()},
        "p50_ms_median": {name: round(statistics.median(values), 3) for name, values in wall.items()},
        "load_1min_min_mean_max": [round(min(loads), 2), round(statistics.mean(loads), 2), round(max(loads), 2)],
    }  # fmt: skip


def measure(key: str, subject: Subject, threads: int, workdir: Path, report: Callable[[dict[str, Any]], None]) -> None:
    started = time.perf_counter()
    runners = build_runners(subject, key, workdir, threads)
    built_s = round(time.perf_counter() - started, 1)
    generator = torch.Generator().manual_seed(0)
    for size, plan in PLANS[key].items():
        if subject.inputs.kind == "validation":
            batch, _ = subject.inputs.take(size)
        else:
            batch = torch.randn((size, *subject.shape), generator=generator)
        report({
            "model": subject.name, "batch_size": size, "threads": threads, "cpus": os.cpu_count(),
            "inputs": subject.inputs.note, "export_and_quantize_s": built_s,
            "agreement_with_eager": agreement(subject, runners, batch), **interleaved(runners, batch, plan),
        })  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(PLANS), default=sorted(PLANS))
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads, for each runtime alike")
    parser.add_argument("--checkpoint", type=Path, default=RUN / "checkpoints", help="the digits checkpoint root")
    args = parser.parse_args()
    args.checkpoint = args.checkpoint.resolve()
    if "digits" in args.models and not args.checkpoint.exists():
        print(f"bench/export_latency.py: --checkpoint {args.checkpoint} does not exist: run `make demo` first",
              file=sys.stderr)  # fmt: skip
        return 2
    torch.set_num_threads(args.threads)
    os.chdir(ROOT)  # the demo's checkpoint names its data relative to the repository (examples/digits.yaml)
    subjects = {"digits": lambda: digits(args.checkpoint), "resnet50": resnet50}
    with tempfile.TemporaryDirectory() as tmp:
        for key in args.models:
            measure(key, subjects[key](), args.threads, Path(tmp), lambda row: print(json.dumps(row), flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
