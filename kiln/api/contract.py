"""What the operator, the trainer pods and ``kiln run`` agree on, stated once.

The operator renders pods from these names, the trainer reads them back, and ``kiln run`` imitates the pod
on a laptop with them: the spec file's place, the ports, the environment variables, the exit codes and the
shape of the trainer's report (its ``/progress`` JSON and its termination message). Torch-free and
kopf-free, so every side imports it.

The exporter pod (an ExportJob's batch/v1 Job, running the trainer image) follows the same contract:

- command ``python -m kiln.trainer.export`` (optionally ``--spec PATH``; the default is
  ``SPEC_DIR/EXPORT_SPEC_FILE``), reading a :class:`kiln.api.export_resolve.ResolvedExportJob` whose
  ``spec.source.checkpointUri`` and ``spec.output.uri`` are already resolved (the operator turns
  ``source.trainingJob`` + ``checkpoint`` into the URI from that TrainingJob's status before rendering);
- environment: ``Env.TERMINATION_LOG`` (default ``TERMINATION_LOG``), ``Env.CACHE_DIR`` (where the source
  job's validation data is staged), and the S3 credentials from the Secret, as for the trainer;
- outputs: the artifacts, a model card per artifact and ``EXPORT_REPORT_FILE`` (the full
  :class:`ExportReport`) under ``spec.output.uri``; the compact ExportReport (``ExportReport.to_json``, under
  ``REPORT_LIMIT``) in the termination log, which the operator reads with :func:`parse_export_report`;
- exit codes: :class:`ExitCode` (0 exported and verified; 1 failed, retriable only when listed; 2 invalid
  input, such as a missing checkpoint or one of a task the exporter does not know; 3 verification failed).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from enum import IntEnum
from typing import Annotated, Any, Literal, TypeVar

from pydantic import Field, ValidationError

from kiln.api.base import MAX_LIST, MAX_TEXT, Uri
from kiln.api.status import (
    MAX_CONTROL_TOKEN,
    Artifact,
    CheckpointStatus,
    ControlStatus,
    ExportedWeights,
    LatencyMs,
    Progress,
    Reason,
    StatusModel,
    VerificationInputs,
)

# -- files and ports inside a trainer pod -------------------------------------------------------------------
SPEC_DIR = "/etc/kiln"
"""Where the ConfigMap holding the ResolvedTrainingJob is mounted."""
SPEC_FILE = "trainingjob.json"
"""The ConfigMap key, and so the file name, of the ResolvedTrainingJob JSON."""
EXPORT_SPEC_FILE = "exportjob.json"
"""The ConfigMap key, and so the file name under SPEC_DIR, of the ResolvedExportJob JSON the exporter reads."""
EXPORT_REPORT_FILE = "export-report.json"
"""The exporter's full ExportReport (benchmarks untrimmed), written under spec.output.uri next to the artifacts."""
EXPORTER_CONTAINER_NAME = "exporter"
"""The exporter container's name in an ExportJob's pod."""
TERMINATION_LOG = "/dev/termination-log"
"""Kubernetes' default terminationMessagePath; the trainer writes its final report there."""
CACHE_DIR = "/var/cache/kiln"
"""The dataset staging cache in every worker pod: an emptyDir, or the claim data.staging.cacheClaim resolves to."""
METRICS_PORT = 9400
"""Local rank 0 of each pod serves /metrics (Prometheus) here, global rank 0 also /progress (the report); local
rank k serves its own /metrics on METRICS_PORT + k, so every rank of a multi-process pod is scraped."""
METRICS_PORT_NAME_PATTERN = "metrics(-[0-9]+)?"
"""The container port names of the trainer's /metrics ports (:func:`metrics_port_name`), for a PodMonitor's
relabeling keep rule: one scrape target per rank."""
RENDEZVOUS_PORT = 29500
"""torchrun's c10d rendezvous port on pod 0 (torch's default)."""
CONTAINER_NAME = "trainer"
"""The trainer container's name in every worker pod."""
DEFAULT_TRAINER_IMAGE = "ghcr.io/kiln-dev/kiln-trainer:0.1.0"
"""The trainer image of jobs that name none, unless the operator is configured with another."""
PROGRESS_PATH = "/progress"
"""Global rank 0's GET: the latest TrainerReport as JSON (the operator's poll, ``kiln run``'s progress bars)."""
CONTROL_PATH = "/control"
"""Global rank 0's POST: a ControlRequest from the operator; the answer is the report, as on PROGRESS_PATH."""


class Annotation:
    """Annotations a user (or ``kubectl kiln``) sets on a TrainingJob to control the running attempt."""

    STOP = "kiln.dev/stop"
    """``"true"``: save a checkpoint at the next step boundary, evaluate the best checkpoint, end Succeeded with
    reason Stopped. Any other value is no request."""
    STOP_VALUE = "true"
    CHECKPOINT = "kiln.dev/checkpoint"
    """Any new value (a token, at most MAX_CONTROL_TOKEN characters): save a checkpoint at the next step boundary;
    status.control.checkpointAcknowledged then holds the token and status.control.checkpoint the checkpoint."""


class Label:
    """Labels on every pod of a TrainingJob's attempt (the operator sets them; ``kubectl kiln logs`` selects by
    them)."""

    TRAINING_JOB = "kiln.dev/training-job"
    ATTEMPT = "kiln.dev/attempt"
    COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"
    """Set by Kubernetes on Indexed Job pods (label and annotation): the pod's node rank."""


class ControlRequest(StatusModel):
    """What the operator POSTs to CONTROL_PATH: the wanted state, derived from the annotations. Idempotent: the same
    request again changes nothing, so the operator sends it on every poll until rank 0 acknowledges it."""

    stop: bool = False
    """Stop gracefully (kiln.dev/stop). Sticky: a later request without it does not cancel a stop."""

    checkpoint: Annotated[str, Field(min_length=1, max_length=MAX_CONTROL_TOKEN)] | None = None
    """Save a checkpoint for this token (kiln.dev/checkpoint), unless it is the one last acknowledged."""


class Env:
    """Environment variables the operator (or ``kiln run``) sets and the trainer reads."""

    METRICS_PORT = "KILN_METRICS_PORT"
    """Port of local rank 0's status server (local rank k: this + k); 0 turns them off."""
    METRICS_PORTS = "KILN_METRICS_PORTS"
    """Comma-separated ports, one per local rank, instead of METRICS_PORT + k: ``kiln run`` puts several "nodes"
    on one host, so it hands every rank a free port of its own."""
    TERMINATION_LOG = "KILN_TERMINATION_LOG"
    """Path the final report is written to."""
    CACHE_DIR = "KILN_CACHE_DIR"
    """Node-local dataset cache root, unless data.staging.cacheDir says otherwise."""
    ATTEMPT = "KILN_ATTEMPT"
    """The TrainingJob's attempt number (1, 2, ...), for the trainer's log lines."""
    LOG_STREAM = "KILN_LOG_STREAM"
    """stdout or stderr (the default): where the trainer's log lines go. ``kiln run`` picks stdout so that
    stderr carries only the launcher's own noise."""


MALLOC_ENV = {"MALLOC_TRIM_THRESHOLD_": str(1 << 30), "MALLOC_MMAP_THRESHOLD_": str(32 << 20)}
"""glibc's malloc tuning for every trainer process (pods and ``kiln run``; torchrun's workers inherit it). With
glibc's dynamic thresholds, memory freed at the end of a CPU training step goes back to the kernel and the next
step faults it in again page by page: 18,000 minor faults per step and 0.905 of a plain loop's throughput in
bench/segmentation_overhead.py; with the thresholds fixed (mmap only above 32 MiB, trim only above 1 GiB free),
0 faults and 0.98 (docs/benchmarks.md). CUDA memory is torch's caching allocator's, unaffected."""


def metrics_port_name(local_rank: int) -> str:
    """The trainer container's port name for local rank ``local_rank``'s /metrics (at most 15 characters)."""
    return "metrics" if local_rank == 0 else f"metrics-{local_rank}"


class MetricLabel:
    """Labels on every per-job Prometheus series (the trainer's and the operator's per-TrainingJob ones). Not
    ``namespace`` or ``job``: Prometheus sets those on every target, and a clash would rename ours."""

    NAMESPACE = "trainingjob_namespace"
    JOB = "trainingjob"
    RANK = "rank"
    """The global rank."""
    NODE_RANK = "node_rank"
    """The node's (pod's) index in the gang."""


class ExitCode(IntEnum):
    """The trainer's exit codes; the operator's retry policy and ``kiln run`` read them.

    Signals (exit code 128 + n) and pod disruptions are always retriable. ``FAILED`` is retried only when
    runPolicy.retriableExitCodes lists 1; ``INVALID`` never is: a retry cannot fix the input.
    """

    OK = 0
    """Finished, or preempted (SIGTERM) with a checkpoint saved."""
    FAILED = 1
    """Any other failure: an S3 outage, a bug, out of memory."""
    INVALID = 2
    """Invalid input: the spec, the data or a name; the report's reason names the field or file. For the
    exporter also a missing checkpoint, or one that is not a Kiln checkpoint of a task it exports."""
    VERIFICATION_FAILED = 3
    """Exporter only: an artifact's outputs differ from eager PyTorch's by more than verify.tolerance. Never
    retriable: the same checkpoint and spec export the same graph."""
    DEADLINE = 124
    """``kiln run`` only: runPolicy.activeDeadlineSeconds passed (the exit code of coreutils timeout)."""


TrainerState = Literal["running", "completed", "preempted", "failed"]

# Kubernetes truncates termination messages at 4096 bytes; reports stay under this.
REPORT_LIMIT = 4000
REASON_LIMIT = 3000


class TrainerReport(StatusModel):
    """What rank 0 says: served on GET /progress while it runs, written to the termination log at exit."""

    state: TrainerState = "running"
    """running, completed, preempted (SIGTERM, checkpoint saved) or failed."""

    progress: Progress | None = None
    """Epoch, step, metrics and ETA."""

    checkpoints: CheckpointStatus | None = None
    """The latest and best checkpoint URIs."""

    stop_reason: Annotated[str, Field(max_length=MAX_TEXT)] | None = None
    """Why a completed run ended before its last epoch (early stopping)."""

    reason: Annotated[str, Field(max_length=MAX_TEXT)] | None = None
    """One line: why the run failed."""

    exit_code: ExitCode | None = None
    """The trainer's own exit code when it failed (torchrun reports every child failure as 1)."""

    control: ControlStatus | None = None
    """What rank 0 did with the control requests it received."""

    @property
    def stopped(self) -> bool:
        """Whether a stop request (kiln.dev/stop) ended the run before its last epoch."""
        return self.control is not None and self.control.stopped_at_step is not None

    @property
    def finished_cleanly(self) -> bool:
        return self.state in ("completed", "preempted")

    def to_json(self) -> str:
        """Compact JSON under the termination-message limit: metrics are dropped, least important last, then the
        oldest kept checkpoints (latest and best stay named on their own)."""
        payload = self.to_dict()
        progress = payload.get("progress") or {}
        metrics: dict[str, float] = progress.get("metrics", {})
        kept: list[Any] = (payload.get("checkpoints") or {}).get("kept", [])
        keep = sorted(metrics, key=lambda name: (not name.startswith("val/"), name))
        while True:
            if progress:
                progress["metrics"] = {name: metrics[name] for name in keep}
            text = json.dumps(payload, separators=(",", ":"))
            if len(text.encode()) <= REPORT_LIMIT or not (keep or kept):
                return text
            if keep:
                keep.pop()
            else:
                kept.pop(0)

    @classmethod
    def failure(cls, reason: str, exit_code: ExitCode) -> TrainerReport:
        return cls(state="failed", reason=" ".join(reason.split())[:REASON_LIMIT], exit_code=exit_code)


def is_retriable_exit(code: int, retriable_exit_codes: Iterable[int]) -> bool:
    """Whether an attempt that ended with exit code ``code`` is worth a whole-gang restart: a signal (128 + n)
    always is, any other code only when runPolicy.retriableExitCodes lists it. The operator (with the trainer's
    own code from its report) and ``kiln run`` both decide with this rule."""
    return code >= 128 or code in set(retriable_exit_codes)


_Report = TypeVar("_Report", bound=StatusModel)


def parse_report(text: str | None) -> TrainerReport | None:
    """A report from a termination message or a /progress body; None when the text is not one.

    Unknown keys are tolerated (a newer trainer may report more); a malformed value is not a report.
    """
    return _parse_known(text, TrainerReport)


# -- the exporter's report ------------------------------------------------------------------------------------
ExportState = Literal["completed", "failed"]


class ExportReport(StatusModel):
    """What the exporter says when it exits: the termination message (compact, ``to_json``), the full
    ``EXPORT_REPORT_FILE`` next to the artifacts, and what ``kiln export`` prints its table from. The operator
    copies its job-level fields and artifacts into ExportJobStatus."""

    state: ExportState
    """completed (every artifact written and verified) or failed."""

    reason: Annotated[str, Field(max_length=MAX_TEXT)] | None = None
    """One line: why the export failed, with the numbers (a verification failure names the artifact, its max
    abs diff and the tolerance)."""

    condition_reason: Reason | None = None
    """The Failed condition's reason: VerificationFailed, InvalidSpec, SourceNotFound, SourceUnreadable,
    InvalidSource or ExportFailed; Exported when completed."""

    exit_code: ExitCode | None = None
    """The exporter's exit code."""

    source_checkpoint: Uri | None = None
    """The checkpoint file that was exported."""

    source_sha256: Annotated[str, Field(max_length=64)] | None = None
    """SHA-256 of that file."""

    training_job: Annotated[str, Field(max_length=253)] | None = None
    """The TrainingJob that wrote the checkpoint (as the checkpoint records it)."""

    exported_weights: ExportedWeights | None = None
    """ema (the run's exponential moving average, preferred when present) or model."""

    verification_inputs: VerificationInputs | None = None
    """validation (the source job's validation images) or random: what verification and quantization ran on."""

    reference_latency_ms: Annotated[dict[str, LatencyMs], Field(max_length=MAX_LIST)] = Field(default_factory=dict)
    """Eager PyTorch's latency per benchmarked batch size, measured in the same run as the artifacts."""

    report_uri: Uri | None = None
    """Where the full report (EXPORT_REPORT_FILE) was written."""

    artifacts: Annotated[list[Artifact], Field(max_length=8)] = Field(default_factory=list)
    """Every artifact written, also when the export failed (a failed verification keeps its numbers)."""

    def to_json(self) -> str:
        """Compact JSON under the termination-message limit. What goes first is what status can best do without:
        benchmark detail (throughput, the reference and per-artifact latencies, the fp32 ratios), then the card
        URIs and the free-text reasons, then the speedups; artifacts are cut to their identity and verdicts last,
        and dropped (reportUri still names the full report) only if even that does not fit."""
        payload = self.to_dict()
        artifacts: list[dict[str, Any]] = payload.get("artifacts", [])
        text = json.dumps(payload, separators=(",", ":"))
        for trim in _REPORT_TRIMS:
            if len(text.encode()) <= REPORT_LIMIT:
                break
            trim(payload, artifacts)
            text = json.dumps(payload, separators=(",", ":"))
        return text

    @classmethod
    def failure(cls, reason: str, exit_code: ExitCode, condition_reason: Reason, **fields: Any) -> ExportReport:
        return cls(
            state="failed",
            reason=" ".join(reason.split())[:REASON_LIMIT],
            exit_code=exit_code,
            condition_reason=condition_reason,
            **fields,
        )


def _shorten(payload: dict[str, Any], key: str, limit: int) -> None:
    text = payload.get(key)
    if isinstance(text, str) and len(text) > limit:
        payload[key] = text[: limit - 3] + "..."


def _drop(*keys: str) -> Callable[[dict[str, Any], list[dict[str, Any]]], None]:
    def trim(_payload: dict[str, Any], artifacts: list[dict[str, Any]]) -> None:
        for artifact in artifacts:
            for key in keys:
                artifact.pop(key, None)

    return trim


def _shorten_reasons(payload: dict[str, Any], artifacts: list[dict[str, Any]]) -> None:
    for artifact in artifacts:
        _shorten(artifact, "fallbackReason", 120)
        _shorten(artifact, "notRecommendedReason", 200)
    _shorten(payload, "reason", 1000)


def _essentials(_payload: dict[str, Any], artifacts: list[dict[str, Any]]) -> None:
    keep = {"format", "quantization", "uri", "sizeBytes", "sha256", "verified", "maxAbsDiff", "recommended"}
    for artifact in artifacts:
        for key in set(artifact) - keep:
            del artifact[key]


def _no_artifacts(payload: dict[str, Any], artifacts: list[dict[str, Any]]) -> None:
    artifacts.clear()
    _shorten(payload, "reason", 500)


_REPORT_TRIMS = (
    _drop("throughput"),
    lambda payload, _artifacts: payload.pop("referenceLatencyMs", None),
    _drop("latencyMs", "fp32Speedup"),
    _drop("modelCardUri"),
    _shorten_reasons,
    _drop("speedup"),
    _essentials,
    _no_artifacts,
)


def parse_export_report(text: str | None) -> ExportReport | None:
    """An ExportReport from a termination message or an EXPORT_REPORT_FILE; None when the text is not one.

    Like :func:`parse_report`: unknown keys are tolerated (a newer exporter may report more), a malformed value
    is not a report.
    """
    return _parse_known(text, ExportReport)


def _parse_known(text: str | None, model: type[_Report]) -> _Report | None:
    """``model`` from a JSON object's keys that it knows (by alias or name); None when the text is no such object
    or a known value is malformed."""
    if not text or not text.strip():
        return None
    try:
        data = json.loads(text)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    keys = {field.alias or name for name, field in model.model_fields.items()}
    try:
        return model.model_validate({key: value for key, value in data.items() if key in keys})
    except ValidationError:
        return None
