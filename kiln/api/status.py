"""Status shapes shared by TrainingJob and ExportJob: phases, metav1.Condition-shaped conditions, progress."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Literal

from pydantic import ConfigDict, Field

from kiln.api.base import MAX_LIST, MAX_MAP, MAX_TEXT, KilnModel, Uri

MAX_CONTROL_TOKEN = 253
"""The longest kiln.dev/checkpoint value acted on: `kubectl kiln checkpoint` refuses a longer one, the operator logs a
warning and ignores it."""


class Phase(StrEnum):
    PENDING = "Pending"
    QUEUED = "Queued"
    RUNNING = "Running"
    RESTARTING = "Restarting"
    SUSPENDED = "Suspended"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


TERMINAL_PHASES = frozenset({Phase.SUCCEEDED, Phase.FAILED})


class ConditionType(StrEnum):
    CREATED = "Created"
    WAITING_FOR_SOURCE = "WaitingForSource"
    QUEUED = "Queued"
    RUNNING = "Running"
    RESTARTING = "Restarting"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    SUSPENDED = "Suspended"
    SPEC_CHANGE_PENDING = "SpecChangePending"


class Reason(StrEnum):
    """Machine-readable reasons on conditions; docs/operations.md explains each."""

    CHILDREN_CREATED = "ChildrenCreated"
    AWAITING_ADMISSION = "AwaitingAdmission"
    ADMITTED = "Admitted"
    PODS_RUNNING = "PodsRunning"
    PODS_STARTING = "PodsStarting"
    UNSCHEDULABLE = "Unschedulable"
    WORKER_FAILED_RETRIABLE = "RetriableFailure"
    JOB_COMPLETED = "JobCompleted"
    WORKER_FAILED = "WorkerFailed"
    RESTART_LIMIT = "RestartLimitExceeded"
    INVALID_SPEC = "InvalidSpec"
    DEADLINE_EXCEEDED = "DeadlineExceeded"
    SUSPENDED_BY_USER = "SuspendedByUser"
    RESUMED = "Resumed"
    APPLIES_AT_NEXT_ATTEMPT = "AppliesAtNextAttempt"
    JOB_FINISHED = "JobFinished"
    SPEC_APPLIED = "SpecApplied"
    EPOCHS_RAISED = "EpochsRaised"
    STOPPED = "Stopped"
    EXPORTED = "Exported"
    VERIFICATION_FAILED = "VerificationFailed"
    SOURCE_NOT_FOUND = "SourceNotFound"
    SOURCE_UNREADABLE = "SourceUnreadable"
    INVALID_SOURCE = "InvalidSource"
    EXPORT_FAILED = "ExportFailed"
    WAITING_FOR_SOURCE = "WaitingForSource"
    SOURCE_READY = "SourceReady"
    SOURCE_FAILED = "SourceFailed"


BLOCKED_CONTAINER_REASONS = frozenset(
    {"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "CreateContainerConfigError", "CreateContainerError"}
)
"""The kubelet's container waiting reasons that do not pass by themselves (ContainerCreating and PodInitializing
do); the reason of Running=False, verbatim, while a pod of the current attempt waits with one."""
BLOCKED_REASONS = BLOCKED_CONTAINER_REASONS | {Reason.UNSCHEDULABLE}
"""Running=False reasons that say a pod cannot start (the kiln_trainingjob_blocked gauge, its alert)."""


class StatusModel(KilnModel):
    """Status is written by the operator and read back from the apiserver as plain JSON, whose strings
    become the enums above; lax parsing is what lets them."""

    model_config = ConfigDict(strict=False)


class Condition(StatusModel):
    type: ConditionType
    """Condition type."""

    status: Literal["True", "False", "Unknown"]
    """Whether the condition holds."""

    reason: Annotated[str, Field(max_length=1024)]
    """CamelCase machine-readable cause."""

    message: Annotated[str, Field(max_length=MAX_TEXT)] = ""
    """Human-readable detail, such as the field path of an invalid spec or a worker's termination message."""

    last_transition_time: Annotated[str, Field(max_length=64)]
    """When status last changed (RFC 3339)."""

    observed_generation: int | None = None
    """The .metadata.generation the condition was set for."""


Conditions = Annotated[
    list[Condition],
    Field(max_length=16, json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]}),
]


class WorkerCounts(StatusModel):
    active: int = 0
    """Pods of the current attempt that are running or pending."""

    succeeded: int = 0
    """Pods of the current attempt that completed."""

    failed: int = 0
    """Pods of the current attempt that failed."""


class Progress(StatusModel):
    epoch: int = 0
    """Epochs completed."""

    total_epochs: int = 0
    """Epochs planned."""

    step: int = 0
    """Optimizer steps completed, across restarts."""

    percent: float = 0.0
    """Share of the planned optimizer steps done, 0-100."""

    eta_seconds: float | None = None
    """Estimated seconds to finish, from the recent step rate."""

    metrics: Annotated[dict[str, float], Field(max_length=MAX_MAP)] = Field(default_factory=dict)
    """The latest training and validation metrics (train/loss, val/accuracy, ...)."""

    metric: Annotated[str, Field(max_length=128)] | None = None
    """The deciding validation metric as name=value, for kubectl get."""

    updated_at: Annotated[str, Field(max_length=64)] | None = None
    """When the trainer last reported (RFC 3339)."""


class KeptCheckpoint(StatusModel):
    uri: Uri
    """URI of the checkpoint's state.pt."""

    epoch: int
    """Epochs completed when it was saved."""

    step: int
    """Optimizer steps completed when it was saved."""

    metric: float | None = None
    """The deciding validation metric at that point; unset when it was saved without a validation (mid-epoch)."""


class CheckpointStatus(StatusModel):
    latest: Uri | None = None
    """URI of the most recent checkpoint."""

    best: Uri | None = None
    """URI of the best checkpoint by validation.metric."""

    best_metric: float | None = None
    """The deciding metric's value at the best checkpoint."""

    kept: Annotated[list[KeptCheckpoint], Field(max_length=MAX_LIST)] | None = None
    """Every checkpoint checkpoint.keepLast and keepBest keep, oldest first (at most 64, the newest)."""


class ControlStatus(StatusModel):
    """What rank 0 did with the control annotations (kiln.dev/stop, kiln.dev/checkpoint). Unset fields are
    unknown, not false: a restarted attempt reports only what it was asked itself."""

    stop_requested: bool | None = None
    """The trainer received kiln.dev/stop: it saves a checkpoint at the next step boundary, evaluates the best
    checkpoint and ends Succeeded with reason Stopped."""

    stopped_at_step: int | None = None
    """The optimizer step the run stopped at on request."""

    checkpoint_acknowledged: Annotated[str, Field(max_length=MAX_CONTROL_TOKEN)] | None = None
    """The last kiln.dev/checkpoint value the trainer acted on."""

    checkpoint: Uri | None = None
    """The checkpoint saved for it (retention may delete it later, like any other)."""

    checkpoint_step: int | None = None
    """The optimizer step of that checkpoint."""


class TrainingJobStatus(StatusModel):
    phase: Phase = Phase.PENDING
    """Pending, Queued, Running, Restarting, Suspended, Succeeded or Failed."""

    conditions: Conditions = Field(default_factory=list)
    """Created, Queued, Running, Restarting, Succeeded, Failed, Suspended and SpecChangePending, one entry each."""

    observed_generation: int | None = None
    """The newest .metadata.generation that is wholly in effect. While SpecChangePending is True it stays at the
    generation the running attempt was created from (or whose runPolicy was last applied)."""

    attempt: int = 0
    """Current attempt number; each whole-gang restart starts a new one."""

    restarts: int = 0
    """Whole-gang restarts so far."""

    start_time: Annotated[str, Field(max_length=64)] | None = None
    """When the first attempt started (RFC 3339)."""

    completion_time: Annotated[str, Field(max_length=64)] | None = None
    """When the job succeeded or failed (RFC 3339)."""

    workers: WorkerCounts = Field(default_factory=WorkerCounts)
    """Pod counts of the current attempt."""

    progress: Progress | None = None
    """Live training progress, reported by rank 0."""

    checkpoints: CheckpointStatus | None = None
    """Checkpoint URIs, reported by rank 0."""

    control: ControlStatus | None = None
    """The control annotations' acknowledgements, reported by rank 0."""


class LatencyMs(StatusModel):
    p50: float
    """Median latency in milliseconds."""

    p95: float
    """95th-percentile latency in milliseconds."""


Quantization = Literal["none", "dynamic", "static"]
ExportedWeights = Literal["ema", "model"]
VerificationInputs = Literal["validation", "random"]


class Artifact(StatusModel):
    format: Literal["onnx", "torchscript", "pt2"]
    """Export format."""

    quantization: Quantization = "none"
    """none (fp32), dynamic (int8 weights) or static (int8 weights and activations, QDQ); ONNX only."""

    uri: Uri
    """Where the exported model was written."""

    size_bytes: int
    """File size."""

    sha256: Annotated[str, Field(max_length=64)]
    """SHA-256 of the file."""

    model_card_uri: Uri | None = None
    """The model card (JSON) written next to the artifact: task, classes, input, normalization, provenance."""

    exporter: Literal["dynamo", "legacy"] | None = None
    """ONNX only: the torch.onnx exporter that produced the graph; legacy only after the dynamo one failed."""

    fallback_reason: Annotated[str, Field(max_length=1024)] | None = None
    """Why the dynamo exporter failed when exporter is legacy."""

    verified: bool | None = None
    """Whether the artifact's outputs stayed within verify.tolerance of eager PyTorch's. Quantized artifacts are
    judged by metricDelta instead and leave this unset."""

    max_abs_diff: float | None = None
    """Largest absolute difference from the PyTorch model's outputs over the verification samples."""

    top1_agreement: float | None = None
    """Classification: the share of verification inputs whose top-1 class matches eager PyTorch's (0-1)."""

    metric_delta: float | None = None
    """Quantized artifacts: the validation metric (accuracy, or mIoU for segmentation) minus the fp32 ONNX
    artifact's, on the source job's validation images; negative is worse. Unset without validation data."""

    latency_ms: Annotated[dict[str, LatencyMs], Field(max_length=MAX_LIST)] = Field(default_factory=dict)
    """Latency per benchmarked batch size (keys are batch sizes)."""

    throughput: Annotated[dict[str, float], Field(max_length=MAX_LIST)] = Field(default_factory=dict)
    """Images per second per benchmarked batch size."""

    speedup: Annotated[dict[str, float], Field(max_length=MAX_LIST)] = Field(default_factory=dict)
    """Eager PyTorch's p50 latency divided by this artifact's, per batch size, measured in the same run
    (above 1: faster than eager)."""

    fp32_speedup: Annotated[dict[str, float], Field(max_length=MAX_LIST)] = Field(default_factory=dict)
    """Quantized artifacts: the fp32 ONNX artifact's p50 latency divided by this one's, per batch size."""

    recommended: bool | None = None
    """Whether to deploy this artifact: false when it failed verification, or is quantized and slower than fp32
    or loses more than quantize.maxMetricDrop."""

    not_recommended_reason: Annotated[str, Field(max_length=1024)] | None = None
    """Why recommended is false, with the numbers."""


class ExportJobStatus(StatusModel):
    phase: Phase = Phase.PENDING
    """Pending, Running, Succeeded or Failed."""

    conditions: Conditions = Field(default_factory=list)
    """Created, WaitingForSource, Running, Succeeded and Failed, one entry each."""

    observed_generation: int | None = None
    """The .metadata.generation the operator last acted on (the spec is immutable, so there is only one)."""

    source_checkpoint: Uri | None = None
    """The checkpoint that was exported, after resolving source."""

    source_sha256: Annotated[str, Field(max_length=64)] | None = None
    """SHA-256 of the exported checkpoint file (state.pt)."""

    exported_weights: ExportedWeights | None = None
    """ema when the run kept an exponential moving average of its weights (exported in preference), else model."""

    verification_inputs: VerificationInputs | None = None
    """validation: the source job's validation images were reachable and used; random: random inputs."""

    reference_latency_ms: Annotated[dict[str, LatencyMs], Field(max_length=MAX_LIST)] = Field(default_factory=dict)
    """Eager PyTorch's latency per benchmarked batch size, the reference each artifact's speedup divides."""

    artifacts: Annotated[list[Artifact], Field(max_length=8)] = Field(default_factory=list)
    """One entry per exported format, plus the quantized ONNX model when quantize.mode is not none."""

    verified: bool | None = None
    """Whether every artifact judged by verify.tolerance (all but quantized ones) passed; set when the export ends
    with artifacts. The Verified column of kubectl get exportjob."""

    start_time: Annotated[str, Field(max_length=64)] | None = None
    """When the export started (RFC 3339)."""

    completion_time: Annotated[str, Field(max_length=64)] | None = None
    """When the export finished (RFC 3339)."""


__all__ = [
    "TERMINAL_PHASES",
    "Artifact",
    "CheckpointStatus",
    "Condition",
    "ConditionType",
    "ControlStatus",
    "ExportJobStatus",
    "ExportedWeights",
    "KeptCheckpoint",
    "LatencyMs",
    "Phase",
    "Progress",
    "Quantization",
    "Reason",
    "TrainingJobStatus",
    "VerificationInputs",
    "WorkerCounts",
]
