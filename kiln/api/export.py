"""ExportJob.spec: turn a training checkpoint into deployable ONNX / TorchScript / torch.export artifacts."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from kiln.api.base import MAX_LIST, MAX_MAP, KilnModel, Name, Quantity, Rule, RuleModel, StorageUri
from kiln.api.runtime import StorageSpec, Toleration

ExportFormat = Literal["onnx", "torchscript", "pt2"]


def _default_formats() -> list[ExportFormat]:
    return ["onnx"]


class ExportSource(RuleModel):
    training_job: Name | None = None
    """A TrainingJob in the same namespace whose checkpoint is exported."""

    checkpoint: Literal["best", "latest"] = "best"
    """Which of the TrainingJob's checkpoints to export."""

    checkpoint_uri: StorageUri | None = None
    """An explicit checkpoint URI (s3:// or a path), instead of trainingJob."""

    __rules__ = (
        Rule(
            cel="has(self.trainingJob) != has(self.checkpointUri)",
            message="give exactly one of trainingJob and checkpointUri",
            holds=lambda s: (s.training_job is None) != (s.checkpoint_uri is None),
            field="trainingJob",
        ),
    )


class OnnxOptions(KilnModel):
    opset: Annotated[int, Field(ge=13, le=23)] = 18
    """ONNX opset version."""

    dynamic_batch: bool = True
    """Make the batch dimension dynamic."""

    dynamic_spatial: bool = False
    """Make height and width dynamic too (not every model traces cleanly with this)."""


class VerifySpec(KilnModel):
    tolerance: Annotated[float, Field(gt=0, le=1)] = 1e-4
    """The largest absolute output difference from PyTorch that still passes."""

    samples: Annotated[int, Field(ge=1, le=1024)] = 8
    """Inputs compared: the source job's validation images when reachable, random inputs otherwise."""


class BenchmarkSpec(KilnModel):
    batch_sizes: Annotated[list[Annotated[int, Field(ge=1, le=4096)]], Field(max_length=8)] = Field(
        default_factory=lambda: [1, 8]
    )
    """Batch sizes to time; an empty list skips the benchmark."""

    iterations: Annotated[int, Field(ge=1, le=100000)] = 50
    """Timed iterations per batch size, after warmup."""


class QuantizeSpec(KilnModel):
    mode: Literal["none", "dynamic", "static"] = "none"
    """ONNX Runtime quantization: dynamic (weights int8) or static (calibrated activations too)."""

    calibration_samples: Annotated[int, Field(ge=1, le=100000)] = 64
    """Inputs used to calibrate static quantization."""

    max_metric_drop: Annotated[float, Field(ge=0, le=1)] = 0.01
    """The largest drop of the validation metric (accuracy, mIoU) against the fp32 ONNX model that still leaves
    the int8 model recommended. A larger drop writes it anyway, marked recommended: false."""

    min_speedup: Annotated[float, Field(gt=0, le=100)] = 1.0
    """The int8 model must be at least this many times faster than the fp32 one (p50 at the largest benchmarked
    batch size) to be recommended; 1.0 refuses only a slower one."""


class ExportResources(KilnModel):
    gpus: Annotated[int, Field(ge=0, le=8)] = 0
    """nvidia.com/gpu requested."""

    cpu: Quantity | None = None
    """CPU request and limit."""

    memory: Quantity | None = None
    """Memory request and limit."""

    node_selector: Annotated[dict[str, Name], Field(max_length=MAX_MAP)] | None = None
    """Node labels the pod must match, as for a TrainingJob (a GPU node pool, for example)."""

    tolerations: Annotated[list[Toleration], Field(max_length=MAX_LIST)] | None = None
    """Taints the pod tolerates (GPU nodes are often tainted)."""


class ExportOutput(KilnModel):
    uri: StorageUri | None = None
    """Where artifacts go. Defaults to <checkpoint's job output>/export/<name>."""


class ExportJobSpec(RuleModel):
    source: ExportSource
    """The checkpoint to export."""

    formats: Annotated[list[ExportFormat], Field(min_length=1, max_length=3)] = Field(default_factory=_default_formats)
    """Formats to produce."""

    onnx: OnnxOptions = Field(default_factory=OnnxOptions)
    """ONNX options."""

    input_shape: Annotated[list[Annotated[int, Field(ge=1, le=16384)]], Field(min_length=3, max_length=3)] | None = None
    """[channels, height, width] of one input. Derived from the training spec when omitted."""

    verify: VerifySpec = Field(default_factory=VerifySpec)
    """Compare each artifact's outputs with PyTorch's (onnxruntime for ONNX)."""

    benchmark: BenchmarkSpec = Field(default_factory=BenchmarkSpec)
    """Latency and throughput measurement."""

    quantize: QuantizeSpec = Field(default_factory=QuantizeSpec)
    """Post-training quantization of the ONNX model."""

    output: ExportOutput = Field(default_factory=ExportOutput)
    """Artifact location."""

    image: Name | None = None
    """Exporter container image. Defaults to the operator's trainer image."""

    resources: ExportResources = Field(default_factory=ExportResources)
    """Pod resources."""

    storage: StorageSpec = Field(default_factory=StorageSpec)
    """S3 connection settings."""

    __rules__ = (
        # An ExportJob runs once: the operator renders its pod from the spec as created. Editing it would leave
        # the status describing a spec that never ran; delete and re-create it to export again.
        Rule(cel="self == oldSelf", message="spec is immutable: delete and re-create the ExportJob to export again"),
        Rule(
            cel="self.formats.all(f, self.formats.exists_one(g, g == f))",
            message="formats must not repeat",
            holds=lambda s: len(set(s.formats)) == len(s.formats),
            field="formats",
        ),
        Rule(
            cel="self.quantize.mode == 'none' || 'onnx' in self.formats",
            message="quantize applies to ONNX: add onnx to formats",
            holds=lambda s: s.quantize.mode == "none" or "onnx" in s.formats,
            field="quantize.mode",
        ),
    )
