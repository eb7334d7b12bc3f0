"""One export, as an outline (``run_export``): load the source, export each format, quantize, verify and benchmark
every artifact against eager PyTorch, judge, upload, report. ``kiln.trainer.export.main`` turns the report into an
exit code, a termination message and ``export-report.json``.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kiln.api.contract import ExitCode, ExportReport
from kiln.api.export import ExportJobSpec
from kiln.api.export_resolve import ResolvedExportJob
from kiln.api.status import Artifact, Quantization, Reason
from kiln.storage import open_store
from kiln.trainer.errors import one_line
from kiln.trainer.export.card import embed_in_onnx, model_card, write_card
from kiln.trainer.export.failures import InvalidSpec
from kiln.trainer.export.formats import FORMATS, INPUT_NAME, Exported, Graph, Runner, load_onnx, torch_runner
from kiln.trainer.export.inputs import InputSource, Shape, input_source, normalization
from kiln.trainer.export.measure import EXAMPLE_BATCH, VERIFY_BATCH, Timing, benchmark, compare, run_batches
from kiln.trainer.export.quantize import quantize
from kiln.trainer.export.source import Source, load_source
from kiln.trainer.export.tasks import ExportTaskInfo

log = logging.getLogger(__name__)

METRIC_IMAGES = 256
"""Validation images a quantized model's metric is compared on (against the fp32 ONNX model's)."""


@dataclass
class Built:
    """One artifact on local disk, loaded in its runtime, with the Artifact fields measured so far."""

    format: str
    quantization: Quantization
    path: Path
    card: Path
    exported: Exported
    runner: Runner
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Run:
    """What every step reads: the resolved spec, the source, and the input they agreed on."""

    spec: ExportJobSpec
    source: Source
    shape: Shape
    device: torch.device
    inputs: InputSource

    @property
    def dynamic_batch(self) -> bool:
        return self.spec.onnx.dynamic_batch and self.source.task.batched

    def card(self, fmt: str, quantization: Quantization) -> dict[str, Any]:
        # onnx.dynamicBatch and dynamicSpatial shape the one torch.export trace, so pt2 follows them too.
        mean, std = normalization(self.source)
        return model_card(
            self.source, export_format=fmt, quantization=quantization, input_shape=self.shape, mean=mean, std=std,
            dynamic_batch=self.dynamic_batch, dynamic_spatial=self.spec.onnx.dynamic_spatial, input_name=INPUT_NAME,
        )  # fmt: skip


def input_shape(spec: ExportJobSpec, source: Source) -> Shape:
    if spec.input_shape is not None:
        channels, height, width = spec.input_shape
        return channels, height, width
    size = source.job.spec.data.image_size
    return int(source.job.spec.model.args.get("in_chans", 3)), size, size


def pick_device(spec: ExportJobSpec) -> torch.device:
    return torch.device("cuda") if spec.resources.gpus > 0 and torch.cuda.is_available() else torch.device("cpu")


def check_task(spec: ExportJobSpec, task: ExportTaskInfo) -> None:
    """Refuse, before anything is exported, what this task's graph cannot be: a format that cannot hold it, or
    int8 quantization where there is no metric to judge the quantized model by."""
    for name in spec.formats:
        if name in task.refused_formats:
            raise InvalidSpec(f"formats: {name} cannot hold a {task.name} model: {task.refused_formats[name]}")
    if spec.quantize.mode != "none" and task.metric is None:
        raise InvalidSpec(f"quantize.mode {spec.quantize.mode}: {task.name} models are not quantized (no "
                          f"{task.metric_name} for the int8 model to be judged by); use mode none")  # fmt: skip


def export_formats(run: Run, workdir: Path) -> list[Built]:
    spec, task = run.spec, run.source.task
    module = task.graph(run.source.network).eval()
    example = torch.randn(EXAMPLE_BATCH if run.dynamic_batch else 1, *run.shape)
    try:
        with torch.no_grad():
            module(example)
    except Exception as exc:  # the network's own shape checks speak here
        raise InvalidSpec(f"inputShape {list(run.shape)}: the network refuses it: {one_line(exc)}") from exc
    graph = Graph(module, example, task.output_name, spec.onnx.opset, run.dynamic_batch, spec.onnx.dynamic_spatial)
    built = []
    for name in spec.formats:
        info = FORMATS.get(name)
        path = workdir / info.filename
        exported = info.export(graph, path)
        card = run.card(name, "none")
        if name == "onnx":
            embed_in_onnx(card, path)
        built.append(Built(name, "none", path, write_card(card, path), exported, info.load(path, run.device)))
        log.info("exported %s (%s)", path.name, exported.exporter or name)
    return built


def add_quantized(run: Run, built: list[Built]) -> Built | None:
    """The int8 model of quantize.mode, with its validation metric against the fp32 ONNX model's."""
    mode = run.spec.quantize.mode
    fp32 = next((item for item in built if item.format == "onnx"), None)
    if mode == "none" or fp32 is None:
        return None
    target = fp32.path.with_name(f"model.int8-{mode}.onnx")
    path = quantize(fp32.path, target, mode, run.inputs, run.spec.quantize.calibration_samples)
    card = run.card("onnx", mode)
    embed_in_onnx(card, path)
    item = Built("onnx", mode, path, write_card(card, path), fp32.exported, load_onnx(path, run.device))
    if run.inputs.kind == "validation":
        images, targets = run.inputs.take(run.inputs.available(METRIC_IMAGES))
        assert targets is not None
        source, batch, metric = run.source, VERIFY_BATCH if run.dynamic_batch else 1, run.source.task.metric
        assert metric is not None  # check_task refused quantizing a task without one
        before = metric(run_batches(fp32.runner, images, batch), targets, source.job, len(source.class_names))
        after = metric(run_batches(item.runner, images, batch), targets, source.job, len(source.class_names))
        item.fields["metric_delta"] = round(after - before, 6)
    return item


def verify(run: Run, built: list[Built], eager: Runner) -> None:
    """Each artifact against eager PyTorch, in batches other than the export's example batch."""
    images, _ = run.inputs.take(run.spec.verify.samples)
    batch = VERIFY_BATCH if run.dynamic_batch else 1
    reference = run_batches(_comparable(run, eager), images, batch)
    predict = run.source.task.predict if run.source.task.top1 else None
    tolerance = run.spec.verify.tolerance
    for item in built:
        agreement = compare(reference, run_batches(_comparable(run, item.runner), images, batch), predict)
        item.fields.update(max_abs_diff=agreement.max_abs_diff, top1_agreement=agreement.top1)
        if item.quantization != "none":
            continue  # int8 is judged by its metric, not by a float tolerance
        passed = agreement.max_abs_diff <= tolerance
        item.fields.update(verified=passed, recommended=passed)
        if not passed:
            item.fields["not_recommended_reason"] = (
                f"{item.format}: max abs diff {agreement.max_abs_diff:.3g} > verify.tolerance {tolerance:g} "
                f"over {len(images)} {run.inputs.kind} inputs"
            )


def _comparable(run: Run, runner: Runner) -> Runner:
    """The runner whose outputs verification compares: each call's put in the task's canonical form (detections:
    sorted and scaled per image) before calls are concatenated."""
    canonical = run.source.task.canonical
    if canonical is None:
        return runner
    return lambda batch: canonical(runner(batch), run.shape)


def measure_speed(run: Run, built: list[Built], eager: Runner) -> dict[str, Timing]:
    sizes = [size for size in run.spec.benchmark.batch_sizes if run.dynamic_batch or size == 1]
    if sizes != run.spec.benchmark.batch_sizes:
        why = "onnx.dynamicBatch is false" if run.source.task.batched else f"{run.source.task.name} is one image a call"
        log.warning("%s: benchmarking batch size 1 only", why)
    reference = benchmark(eager, run.shape, sizes, run.spec.benchmark.iterations)
    for item in built:
        timings = benchmark(item.runner, run.shape, sizes, run.spec.benchmark.iterations)
        item.fields["latency_ms"] = {size: t.latency for size, t in timings.items()}
        item.fields["throughput"] = {size: t.throughput for size, t in timings.items()}
        item.fields["speedup"] = {size: round(reference[size].latency.p50 / t.latency.p50, 3)
                                  for size, t in timings.items() if t.latency.p50}  # fmt: skip
    return reference


def judge_quantized(run: Run, item: Built, fp32: Built) -> None:
    """recommended: false, with the reasons, when int8 loses more than quantize.maxMetricDrop, is slower than
    quantize.minSpeedup allows at the largest benchmarked batch size, or could not be measured on real data."""
    bounds, metric, reasons = run.spec.quantize, run.source.task.metric_name, []
    delta = item.fields.get("metric_delta")
    if delta is None:
        reasons.append(f"{metric} change unknown: no validation data ({run.inputs.note})")
    elif -delta > bounds.max_metric_drop:
        reasons.append(f"{metric} drops by {-delta:.4f} (> quantize.maxMetricDrop {bounds.max_metric_drop:g})")
    mine, theirs = item.fields.get("latency_ms", {}), fp32.fields.get("latency_ms", {})
    if mine:
        ratios = {size: round(theirs[size].p50 / mine[size].p50, 3) for size in mine}
        item.fields["fp32_speedup"] = ratios
        largest = max(ratios, key=int)
        if ratios[largest] < bounds.min_speedup:
            reasons.append(f"{ratios[largest]:.2f}x the fp32 model's speed at batch {largest} "
                           f"(< quantize.minSpeedup {bounds.min_speedup:g})")  # fmt: skip
    item.fields["recommended"] = not reasons
    if reasons:
        item.fields["not_recommended_reason"] = "; ".join(reasons)


def upload(built: list[Built], resolved: ResolvedExportJob) -> list[Artifact]:
    store = open_store(resolved.output_uri, resolved.spec.storage)
    artifacts = []
    for item in built:
        store.upload_file(item.path.name, item.path)
        store.upload_file(item.card.name, item.card)
        onnx = item.format == "onnx"
        artifacts.append(
            Artifact.model_validate({
                "format": item.format, "quantization": item.quantization, "uri": store.url(item.path.name),
                "size_bytes": item.path.stat().st_size, "sha256": sha256(item.path),
                "model_card_uri": store.url(item.card.name),
                "exporter": item.exported.exporter if onnx else None,
                "fallback_reason": item.exported.fallback_reason if onnx else None,
                **item.fields,
            })
        )  # fmt: skip
    return artifacts


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def run_export(resolved: ResolvedExportJob, workdir: Path) -> ExportReport:
    spec = resolved.spec
    source = load_source(resolved.checkpoint_uri, spec.storage, spec.source.checkpoint)
    check_task(spec, source.task)
    shape = input_shape(spec, source)
    run = Run(spec, source, shape, pick_device(spec), input_source(source, shape))
    built = export_formats(run, workdir)
    quantized = add_quantized(run, built)
    measured = [*built, *([quantized] if quantized else [])]
    eager = torch_runner(source.task.graph(source.network).to(run.device).eval(), run.device)
    verify(run, measured, eager)
    reference = measure_speed(run, measured, eager) if spec.benchmark.batch_sizes else {}
    if quantized is not None:
        judge_quantized(run, quantized, next(item for item in built if item.format == "onnx"))
    failures = [item.fields["not_recommended_reason"] for item in built if item.fields.get("verified") is False]
    return ExportReport(
        state="failed" if failures else "completed",
        reason="; ".join(failures) or None,
        condition_reason=Reason.VERIFICATION_FAILED if failures else Reason.EXPORTED,
        exit_code=ExitCode.VERIFICATION_FAILED if failures else ExitCode.OK,
        source_checkpoint=source.uri,
        source_sha256=source.sha256,
        training_job=source.job.name,
        exported_weights=source.weights,
        verification_inputs=run.inputs.kind,
        reference_latency_ms={size: timing.latency for size, timing in reference.items()},
        artifacts=upload(measured, resolved),
    )
