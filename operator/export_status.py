"""The ExportJob state machine, as pure functions: what was observed in, the next status and actions out.

``next_export_status(observed, now)`` is the whole decision of one ExportJob reconcile, as
``status.next_status`` is for a TrainingJob: it never calls the API, and recomputes phase and conditions from
what is observed, so a repeated reconcile gives the same answer.

- Pending, WaitingForSource: spec.source.trainingJob names a TrainingJob that has not succeeded yet (or does
  not exist yet, for up to ``source_grace_s`` after the ExportJob was created). Nothing runs.
- Pending, Created: the source resolved to one checkpoint URI, which is pinned in status.sourceCheckpoint; the
  ConfigMap and the Job exist, the exporter pod is not running yet.
- Running: the exporter pod is running (the Job replaces it after a signal or a disruption).
- Succeeded / Failed: final. The ExportReport from the pod's termination message fills in the artifacts and
  the numbers, also on failure; its condition reason becomes the Failed reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from pydantic import ValidationError

from kiln.api.contract import ExportReport
from kiln.api.export import ExportJobSpec
from kiln.api.export_resolve import ResolvedExportJob, resolve_export
from kiln.api.status import TERMINAL_PHASES, ConditionType, ExportJobStatus, Phase, Reason
from kiln.operator.conditions import ConditionBuilder, Transition, rfc3339
from kiln.operator.failures import MESSAGE_LIMIT, PodOutcome
from kiln.operator.pending import Blocked, explain_waiting
from kiln.operator.status import JobView

Obj = dict[str, Any]
C, R = ConditionType, Reason


@dataclass(frozen=True)
class SourceView:
    """The source TrainingJob, reduced to what the decision reads."""

    name: str
    exists: bool = False
    phase: Phase = Phase.PENDING
    best: str | None = None
    latest: str | None = None
    run_uri: str | None = None
    """Its output root (spec.output.uri resolved), where the artifacts go by default."""
    failure: str = ""
    """Its Failed condition, as reason: message."""


def source_view(name: str, body: Obj | None, run_uri: str | None = None) -> SourceView:
    """A TrainingJob object (None when it does not exist) as the decision sees it."""
    if body is None or body.get("metadata", {}).get("deletionTimestamp"):
        return SourceView(name=name)
    status = body.get("status") or {}
    checkpoints = status.get("checkpoints") or {}
    failed: Obj = next((c for c in status.get("conditions") or [] if c.get("type") == "Failed"), {})
    try:
        phase = Phase(status.get("phase") or Phase.PENDING)
    except ValueError:
        phase = Phase.PENDING
    return SourceView(
        name=name,
        exists=True,
        phase=phase,
        best=checkpoints.get("best"),
        latest=checkpoints.get("latest"),
        run_uri=run_uri,
        failure=f"{failed.get('reason', '')}: {failed.get('message', '')}".strip(": "),
    )


@dataclass(frozen=True)
class ExportObserved:
    """Everything one decision looks at."""

    name: str
    namespace: str
    uid: str | None
    generation: int | None
    status: ExportJobStatus
    spec: ExportJobSpec | None
    """None when the spec is invalid (then ``invalid`` says why)."""
    invalid: str | None = None
    created_at: datetime | None = None
    """metadata.creationTimestamp: the grace period for a missing source counts from it."""
    source: SourceView | None = None
    """The source TrainingJob, read while the export has not started (or its Job must be created again)."""
    job: JobView = field(default_factory=JobView)
    pod: PodOutcome | None = None
    """The exporter pod that ended last (only once the Job finished)."""
    report: ExportReport | None = None
    """That pod's termination message, parsed."""
    pods_checked: bool = False
    """The exporter's pods were read for ``pending.blocked`` (a resync while the Job runs no ready pod)."""
    blocked: Blocked | None = None
    """Why the exporter pod cannot start, when ``pods_checked``."""
    retries: int = 3
    """The Job's backoffLimit (Settings.export_retries)."""
    source_grace_s: float = 60.0


@dataclass(frozen=True)
class ExportDecision:
    status: ExportJobStatus
    create: ResolvedExportJob | None = None
    """Render and create (or adopt) the ConfigMap and the Job for this resolved export."""
    transitions: tuple[Transition, ...] = ()

    @property
    def invalid(self) -> bool:
        return any(t.type == C.FAILED and t.reason == R.INVALID_SPEC for t in self.transitions)


def next_export_status(observed: ExportObserved, now: datetime) -> ExportDecision:
    status = observed.status
    b = ConditionBuilder(status, now, observed.generation)
    if status.phase in TERMINAL_PHASES:
        decision = ExportDecision(status=status)
    elif observed.spec is None:
        decision = _fail(observed, b, R.INVALID_SPEC, observed.invalid or "invalid spec", now)
    elif not b.holds(C.CREATED):
        decision = _resolve_source(observed, observed.spec, b, now)
    else:
        decision = _follow_job(observed, observed.spec, b, now)
    new_status = decision.status.model_copy(
        update={"conditions": b.ordered(), "observed_generation": observed.generation}
    )
    return replace(decision, status=new_status, transitions=tuple(b.transitions))


def _resolve_source(
    observed: ExportObserved, spec: ExportJobSpec, b: ConditionBuilder, now: datetime
) -> ExportDecision:
    if spec.source.checkpoint_uri is not None:
        return _start(
            observed, spec, b, spec.source.checkpoint_uri, run_uri=None, origin="spec.source.checkpointUri", now=now
        )
    source, which = observed.source or SourceView(name=spec.source.training_job or ""), spec.source.checkpoint
    name = f"TrainingJob {source.name}"
    if not source.exists:
        deadline = (observed.created_at or now) + timedelta(seconds=observed.source_grace_s)
        if now < deadline:
            return _wait(
                observed, b, f"{name} does not exist (yet); the export fails unless it appears by {rfc3339(deadline)}"
            )
        message = (
            f"{name} does not exist in namespace {observed.namespace}: create it, or give spec.source.checkpointUri"
        )
        return _fail(observed, b, R.SOURCE_NOT_FOUND, message, now)
    if source.phase == Phase.FAILED:
        message = f"{name} failed, so no checkpoint of it is exported ({source.failure or 'no reason given'})"
        return _fail(observed, b, R.SOURCE_FAILED, message, now)
    if source.phase != Phase.SUCCEEDED:
        return _wait(observed, b, f"{name} is {source.phase.value}; the export starts when it succeeds")
    uri = source.best if which == "best" else source.latest
    if uri is None:
        hint = "; set source.checkpoint: latest" if which == "best" and source.latest else ""
        message = f"{name} succeeded but its status.checkpoints has no {which} checkpoint{hint}"
        return _fail(observed, b, R.SOURCE_NOT_FOUND, message, now)
    return _start(observed, spec, b, uri, run_uri=source.run_uri, origin=f"the {which} checkpoint of {name}", now=now)


def _wait(observed: ExportObserved, b: ConditionBuilder, message: str) -> ExportDecision:
    b.set(C.WAITING_FOR_SOURCE, True, R.WAITING_FOR_SOURCE, message)
    return ExportDecision(status=observed.status.model_copy(update={"phase": Phase.PENDING}))


def _start(
    observed: ExportObserved,
    spec: ExportJobSpec,
    b: ConditionBuilder,
    checkpoint: str,
    *,
    run_uri: str | None,
    origin: str,
    now: datetime,
) -> ExportDecision:
    """Pin the checkpoint and create the children (again, with the same checkpoint, if the Job went away)."""
    try:
        resolved = resolve_export(
            observed.name, observed.namespace, spec, checkpoint_uri=checkpoint, run_uri=run_uri, uid=observed.uid
        )
    except ValidationError as exc:
        problems = "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors(include_url=False))
        return _fail(observed, b, R.INVALID_SOURCE, f"{origin} ({checkpoint}) cannot be exported: {problems}", now)
    except ValueError as exc:
        return _fail(observed, b, R.INVALID_SOURCE, f"{origin} ({checkpoint}) cannot be exported: {exc}", now)
    if not b.holds(C.CREATED):
        b.set(C.WAITING_FOR_SOURCE, False, R.SOURCE_READY, f"exporting {origin}: {checkpoint}")
    b.set(C.CREATED, True, R.CHILDREN_CREATED, f"ConfigMap and Job created to export {checkpoint}")
    update = {"source_checkpoint": observed.status.source_checkpoint or checkpoint}
    return ExportDecision(status=observed.status.model_copy(update=update), create=resolved)


def _follow_job(observed: ExportObserved, spec: ExportJobSpec, b: ConditionBuilder, now: datetime) -> ExportDecision:
    status, job = observed.status, observed.job
    if not job.exists:
        # Deleted by someone, or the create not visible yet: create it again, from the pinned checkpoint. Its
        # deterministic name makes a second create an adopt, never a duplicate.
        checkpoint = status.source_checkpoint or spec.source.checkpoint_uri or ""
        run_uri = observed.source.run_uri if observed.source is not None else None
        return _start(observed, spec, b, checkpoint, run_uri=run_uri, origin="the pinned source checkpoint", now=now)
    if job.finished:
        return _finish(observed, b, now)
    retried = f" (retry {job.failed}/{observed.retries} after a signal or a disruption)" if job.failed else ""
    if job.ready:
        b.set(C.RUNNING, True, R.PODS_RUNNING, f"the exporter pod is running{retried}")
        update: Obj = {"phase": Phase.RUNNING, "start_time": status.start_time or job.start_time or rfc3339(now)}
        return ExportDecision(status=status.model_copy(update=update))
    if job.failed:
        b.set(C.RUNNING, False, R.WORKER_FAILED_RETRIABLE, f"the exporter pod failed; the Job starts another{retried}")
    explain_waiting(b, observed.blocked, observed.pods_checked, f"the exporter pod is starting{retried}")
    return ExportDecision(status=status.model_copy(update={"phase": Phase.PENDING}))


def _finish(observed: ExportObserved, b: ConditionBuilder, now: datetime) -> ExportDecision:
    status, report, job = observed.status, observed.report, observed.job
    update: Obj = {
        "completion_time": rfc3339(now),
        "start_time": status.start_time or job.start_time or rfc3339(now),
    }
    if report is not None:
        update.update(
            source_checkpoint=report.source_checkpoint or status.source_checkpoint,
            source_sha256=report.source_sha256,
            exported_weights=report.exported_weights,
            verification_inputs=report.verification_inputs,
            reference_latency_ms=dict(report.reference_latency_ms),
            artifacts=list(report.artifacts),
            verified=all_verified(report),
        )
    status = status.model_copy(update=update)
    if job.complete and report is not None and report.state == "completed":
        b.set(C.RUNNING, False, R.EXPORTED, "the export succeeded")
        b.set(C.SUCCEEDED, True, R.EXPORTED, summary(report))
        return ExportDecision(status=status.model_copy(update={"phase": Phase.SUCCEEDED}))
    reason, message = failure_reason(observed)
    return _fail(replace(observed, status=status), b, reason, message, now)


def _fail(observed: ExportObserved, b: ConditionBuilder, reason: Reason, message: str, now: datetime) -> ExportDecision:
    b.set(C.WAITING_FOR_SOURCE, False, reason, message)
    b.set(C.RUNNING, False, reason, "the export failed")
    b.set(C.FAILED, True, reason, message)
    update = {"phase": Phase.FAILED, "completion_time": observed.status.completion_time or rfc3339(now)}
    return ExportDecision(status=observed.status.model_copy(update=update))


def failure_reason(observed: ExportObserved) -> tuple[Reason, str]:
    """Why a finished export failed: the exporter's own report when it wrote one, else the pod and the Job."""
    report, pod, job = observed.report, observed.pod, observed.job
    exit_code = f" (exit code {pod.exit_code})" if pod is not None and pod.exit_code is not None else ""
    if report is not None and report.state == "failed":
        return report.condition_reason or R.EXPORT_FAILED, f"{report.reason or 'the export failed'}{exit_code}"
    if job.complete:
        return R.EXPORT_FAILED, "the exporter exited 0 without an ExportReport in its termination message; see its log"
    what = describe(pod)
    if job.failed_reason == "BackoffLimitExceeded":
        return R.RESTART_LIMIT, f"gave up after {observed.retries} retries (Settings.export_retries): {what}"
    if job.failed_reason == "DeadlineExceeded":
        return R.DEADLINE_EXCEEDED, f"the Job's deadline passed: {what}"
    return R.EXPORT_FAILED, what


def describe(pod: PodOutcome | None) -> str:
    if pod is None:
        return "the exporter pod is gone, so why it failed is unknown"
    if pod.exit_code is None:
        what = f"pod {pod.name} was disrupted ({pod.pod_reason or 'DisruptionTarget'})"
    else:
        what = f"pod {pod.name} exited with code {pod.exit_code}" + (f" ({pod.pod_reason})" if pod.pod_reason else "")
    # Not an ExportReport (the caller parsed that): the log's tail, which FallbackToLogsOnError left instead.
    text = pod.message.strip()[-MESSAGE_LIMIT:]
    return f"{what}: {text}" if text else what


def all_verified(report: ExportReport) -> bool | None:
    """Whether every artifact judged by verify.tolerance passed (quantized ones are judged by metricDelta)."""
    judged = [a.verified for a in report.artifacts if a.verified is not None]
    return all(judged) if judged else None


def summary(report: ExportReport) -> str:
    """The Succeeded message: each artifact with its verification, and why one is not recommended."""
    parts = []
    for artifact in report.artifacts:
        label = (
            artifact.format if artifact.quantization == "none" else f"{artifact.format} ({artifact.quantization} int8)"
        )
        if artifact.max_abs_diff is not None:
            label += f", max abs diff {artifact.max_abs_diff:.3g}"
        if artifact.recommended is False:
            label += f", not recommended: {artifact.not_recommended_reason or 'see the artifact'}"
        parts.append(label)
    return f"exported and verified: {'; '.join(parts)}" if parts else "exported (the report lists no artifacts)"
