"""The TrainingJob state machine, as pure functions: what was observed in, the next status and actions out.

``next_status(observed, now)`` is the whole decision of one reconcile. It never calls the API; the caller
(``reconcile.py``) gathers ``Observed`` and carries out the returned ``Decision``. Phases and conditions
are recomputed from scratch each time, so a repeated or replayed reconcile yields the same answer.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from kiln.api.contract import TrainerReport
from kiln.api.status import (
    TERMINAL_PHASES,
    CheckpointStatus,
    ConditionType,
    ControlStatus,
    Phase,
    Progress,
    Reason,
    TrainingJobStatus,
    WorkerCounts,
)
from kiln.api.training import RunPolicy
from kiln.operator.changes import AppliedSpec, changed_sections, from_annotations
from kiln.operator.conditions import ConditionBuilder, Transition, merge_model, parse_time, rfc3339
from kiln.operator.failures import Failure
from kiln.operator.kueue import KueueVerdict
from kiln.operator.pending import Blocked, explain_waiting

Obj = dict[str, Any]
C, R = ConditionType, Reason


@dataclass(frozen=True)
class JobView:
    """The current attempt's batch/v1 Job, reduced to what decisions read."""

    exists: bool = False
    suspended: bool = False
    active: int = 0
    ready: int = 0
    succeeded: int = 0
    failed: int = 0
    complete: bool = False
    failed_reason: str | None = None
    start_time: str | None = None
    active_deadline_seconds: int | None = None
    applied: AppliedSpec | None = None
    """The spec the attempt runs, from the Job's annotations (None for a Job an older operator made)."""

    @property
    def finished(self) -> bool:
        return self.complete or self.failed_reason is not None


def job_view(job: Obj | None) -> JobView:
    if not job or job.get("metadata", {}).get("deletionTimestamp"):
        return JobView()
    spec, status = job.get("spec", {}), job.get("status", {})
    conditions = {c.get("type"): c for c in status.get("conditions") or [] if c.get("status") == "True"}
    # A Job suspended by Kueue *after* it failed or completed stays finished.
    failed = conditions.get("Failed") or conditions.get("FailureTarget")
    return JobView(
        exists=True,
        suspended=bool(spec.get("suspend")),
        active=int(status.get("active") or 0),
        ready=int(status.get("ready") or 0),
        succeeded=int(status.get("succeeded") or 0),
        failed=int(status.get("failed") or 0),
        complete="Complete" in conditions,
        failed_reason=(failed.get("reason") or "Failed") if failed and "Complete" not in conditions else None,
        start_time=status.get("startTime"),
        active_deadline_seconds=spec.get("activeDeadlineSeconds"),
        applied=from_annotations(job["metadata"].get("annotations")),
    )


@dataclass(frozen=True)
class Observed:
    """Everything one decision looks at."""

    generation: int | None
    nodes: int
    run_policy: RunPolicy
    status: TrainingJobStatus
    job: JobView = field(default_factory=JobView)
    failure: Failure | None = None
    """Why the current attempt failed (only when its Job failed)."""
    report: TrainerReport | None = None
    """Rank 0's termination message (only once its Job finished)."""
    kueue: KueueVerdict | None = None
    """Why Kueue holds the Job suspended, from its Workload (only for a suspended queued Job)."""
    invalid: str | None = None
    """The spec's validation errors, one per line, when it is invalid."""
    wanted: AppliedSpec | None = None
    """The current spec, as a new attempt would record it (None when it is invalid)."""
    pods_checked: bool = False
    """The attempt's pods were read for ``blocked`` (a resync of an admitted attempt not yet all running)."""
    blocked: Blocked | None = None
    """Why a worker of the admitted attempt cannot start (pending.blocked), when ``pods_checked``."""


@dataclass(frozen=True)
class Decision:
    status: TrainingJobStatus
    create_attempt: int | None = None
    """Create (or adopt) the Job of this attempt."""
    delete_attempt: int | None = None
    """Delete this attempt's Job; its pods get SIGTERM and checkpoint."""
    cleanup_attempts: tuple[int, ...] = ()
    """Delete these earlier attempts' Jobs (and their pods) now that the job is over."""
    job_deadline: int | None = None
    """Set the current Job's activeDeadlineSeconds to this (runPolicy.activeDeadlineSeconds changed)."""
    clear_job_deadline: bool = False
    """Remove the current Job's activeDeadlineSeconds (runPolicy.activeDeadlineSeconds was removed)."""
    transitions: tuple[Transition, ...] = ()

    @property
    def acts(self) -> bool:
        """Whether carrying it out touches a Job (creates, deletes or patches one), beyond the status write."""
        deletes = self.delete_attempt is not None or bool(self.cleanup_attempts)
        patches = self.job_deadline is not None or self.clear_job_deadline
        return self.create_attempt is not None or deletes or patches


def _awaiting(run_policy: RunPolicy) -> str:
    return f"waiting for Kueue to admit the Job (queue {run_policy.queue_name})"


def _waiting_phase(run_policy: RunPolicy) -> Phase:
    return Phase.QUEUED if run_policy.queue_name else Phase.PENDING


def _workers(job: JobView) -> WorkerCounts:
    return WorkerCounts(active=job.active, succeeded=job.succeeded, failed=job.failed)


def job_deadline(run_policy: RunPolicy, tj_start: str | None, job_start: str | None, now: datetime) -> int | None:
    """activeDeadlineSeconds for an attempt's Job, whose own clock starts at its startTime (or now)."""
    if run_policy.active_deadline_seconds is None:
        return None
    start = parse_time(tj_start)
    attempt_start = parse_time(job_start) or now
    spent = (attempt_start - start).total_seconds() if start else 0.0
    return max(1, int(run_policy.active_deadline_seconds - spent))


def next_status(observed: Observed, now: datetime) -> Decision:
    status = observed.status
    b = ConditionBuilder(status, now, observed.generation)
    if status.phase in TERMINAL_PHASES:
        decision = _after_finish(observed, b, now)
    elif observed.invalid is not None:
        b.set(C.FAILED, True, R.INVALID_SPEC, observed.invalid)
        decision = _finish(observed, b, Phase.FAILED, now)
    else:
        decision = _decide(observed, b, now)
    generation = _spec_changes(observed, b, decision)
    new_status = decision.status.model_copy(update={"conditions": b.ordered(), "observed_generation": generation})
    return replace(decision, status=new_status, transitions=tuple(b.transitions))


def _after_finish(observed: Observed, b: ConditionBuilder, now: datetime) -> Decision:
    """A finished job stays finished, except that raising spec.epochs continues a Succeeded one."""
    status, wanted, run_policy = observed.status, observed.wanted, observed.run_policy
    ran = _ran_epochs(observed)
    if status.phase != Phase.SUCCEEDED or wanted is None or ran is None or wanted.epochs <= ran:
        return Decision(status=status)
    attempt = status.attempt + 1
    message = f"spec.epochs raised from {ran} to {wanted.epochs}: attempt {attempt} resumes from the latest checkpoint"
    cleared: dict[str, Any] = {"completion_time": None, "start_time": None}  # the deadline clock restarts
    if run_policy.suspend:
        b.set(C.SUCCEEDED, False, R.EPOCHS_RAISED, f"{message} once runPolicy.suspend is false")
        b.set(C.SUSPENDED, True, R.SUSPENDED_BY_USER, "suspended; no pods started")
        update = {**cleared, "phase": Phase.SUSPENDED, "workers": WorkerCounts()}
        return Decision(status=status.model_copy(update=update))
    b.set(C.SUCCEEDED, False, R.EPOCHS_RAISED, message)
    decision = _start_attempt(observed, b, attempt, now)
    return replace(decision, status=decision.status.model_copy(update=cleared))


def _ran_epochs(observed: Observed) -> int | None:
    """spec.epochs of the finished attempt: from its Job, else from the last progress rank 0 reported."""
    if observed.job.applied is not None:
        return observed.job.applied.epochs
    progress = observed.status.progress
    return progress.total_epochs if progress is not None and progress.total_epochs else None


def _spec_changes(observed: Observed, b: ConditionBuilder, decision: Decision) -> int | None:
    """Set SpecChangePending; return the observedGeneration to report (it waits while a change is pending)."""
    status, generation, applied = decision.status, observed.generation, observed.job.applied
    if decision.create_attempt is not None:
        b.set(C.SPEC_CHANGE_PENDING, False, R.SPEC_APPLIED, f"attempt {status.attempt} runs generation {generation}")
        return generation
    if status.phase == Phase.SUSPENDED:
        b.set(C.SPEC_CHANGE_PENDING, False, R.SUSPENDED_BY_USER, "suspended: the resume runs the spec as it is then")
        return generation
    kept = observed.status.observed_generation
    if applied is not None and observed.wanted is not None:
        changed = ", ".join(changed_sections(observed.wanted, applied))
        kept = max(kept or 0, applied.generation or 0) or None
    elif observed.status.phase in TERMINAL_PHASES and kept is not None and generation != kept:
        changed = "spec"  # finished before, and no Job left to compare with (deleted, or an older operator's)
    else:
        changed = ""
    if not changed:
        b.set(C.SPEC_CHANGE_PENDING, False, R.SPEC_APPLIED, f"attempt {status.attempt} runs generation {generation}")
        return generation
    if status.phase in TERMINAL_PHASES:
        message = (
            f"{changed} changed in generation {generation} and was not applied before the job "
            f"{status.phase.value.lower()}: a finished job runs nothing more (only raising spec.epochs continues "
            "a Succeeded job); delete and re-apply it to run it again"
        )
        b.set(C.SPEC_CHANGE_PENDING, True, R.JOB_FINISHED, message)
    else:
        running = applied.generation if applied is not None else kept
        message = (
            f"{changed} changed in generation {generation}; attempt {status.attempt} runs generation {running} "
            "until the next attempt (a restart, or suspend and resume)"
        )
        b.set(C.SPEC_CHANGE_PENDING, True, R.APPLIES_AT_NEXT_ATTEMPT, message)
    return kept


def _decide(observed: Observed, b: ConditionBuilder, now: datetime) -> Decision:
    status, run_policy, job = observed.status, observed.run_policy, observed.job
    attempt = status.attempt
    if attempt == 0 and run_policy.suspend:
        b.set(C.SUSPENDED, True, R.SUSPENDED_BY_USER, "created suspended; no pods started")
        return Decision(status=status.model_copy(update={"phase": Phase.SUSPENDED}))
    if attempt == 0 or (b.holds(C.SUSPENDED) and not run_policy.suspend):
        return _start_attempt(observed, b, attempt + 1, now)
    if run_policy.suspend:
        b.set(C.SUSPENDED, True, R.SUSPENDED_BY_USER, "pods stopped with SIGTERM after checkpointing")
        b.set(C.RUNNING, False, R.SUSPENDED_BY_USER, "suspended")
        b.set(C.QUEUED, False, R.SUSPENDED_BY_USER, "suspended")
        stop = attempt if job.exists and not job.finished else None
        update = {"phase": Phase.SUSPENDED, "workers": _workers(job) if stop is None else status.workers}
        return Decision(status=status.model_copy(update=update), delete_attempt=stop)
    if not job.exists:
        # Someone deleted the Job, or the create has not reached the watch yet: (re)create the same
        # attempt. Its deterministic name makes a second create an adopt, never a duplicate.
        return Decision(status=status, create_attempt=attempt)
    if job.failed_reason == "DeadlineExceeded":
        limit = run_policy.active_deadline_seconds
        b.set(C.FAILED, True, R.DEADLINE_EXCEEDED, f"runPolicy.activeDeadlineSeconds ({limit}s) passed")
        return _finish(observed, b, Phase.FAILED, now)
    if job.failed_reason is not None:
        failure = observed.failure or Failure(retriable=True, message="the attempt failed")
        return _after_failure(observed, b, failure, now)
    if job.complete:
        if observed.report is not None and observed.report.state == "preempted":
            reason = "rank 0 was interrupted (SIGTERM), saved a checkpoint and exited"
            return _after_failure(observed, b, Failure(retriable=True, message=reason), now)
        if observed.report is not None and observed.report.stopped:
            b.set(C.SUCCEEDED, True, R.STOPPED, observed.report.stop_reason or "stopped on request")
            return _finish(observed, b, Phase.SUCCEEDED, now)
        b.set(C.SUCCEEDED, True, R.JOB_COMPLETED, f"all {observed.nodes} workers completed")
        return _finish(observed, b, Phase.SUCCEEDED, now)
    return _observe_running(observed, b, now)


def _start_attempt(observed: Observed, b: ConditionBuilder, attempt: int, now: datetime) -> Decision:
    status, run_policy = observed.status, observed.run_policy
    update: dict[str, Any] = {"attempt": attempt, "phase": _waiting_phase(run_policy), "workers": WorkerCounts()}
    if attempt == 1:
        children = "ConfigMap, headless Service and Job" if observed.nodes > 1 else "ConfigMap and Job"
        b.set(C.CREATED, True, R.CHILDREN_CREATED, f"{children} created")
    if b.holds(C.SUSPENDED):
        b.set(C.SUSPENDED, False, R.RESUMED, f"resumed as attempt {attempt} from the latest checkpoint")
        update["start_time"] = None  # the deadline clock restarts on resume, as for batch/v1 Jobs
    if run_policy.queue_name:
        b.set(C.QUEUED, True, R.AWAITING_ADMISSION, _awaiting(run_policy))
    return Decision(status=status.model_copy(update=update), create_attempt=attempt)


def _after_failure(observed: Observed, b: ConditionBuilder, failure: Failure, now: datetime) -> Decision:
    status, run_policy = observed.status, observed.run_policy
    b.set(C.RUNNING, False, R.WORKER_FAILED_RETRIABLE if failure.retriable else R.WORKER_FAILED, failure.message)
    if failure.retriable and status.restarts < run_policy.max_restarts:
        attempt = status.attempt + 1
        message = f"restart {status.restarts + 1}/{run_policy.max_restarts} as attempt {attempt}: {failure.message}"
        b.set(C.RESTARTING, True, R.WORKER_FAILED_RETRIABLE, message)
        update = {
            "attempt": attempt,
            "restarts": status.restarts + 1,
            "phase": Phase.RESTARTING,
            "workers": WorkerCounts(),
        }
        return Decision(status=status.model_copy(update=update), create_attempt=attempt)
    if failure.retriable:
        message = f"gave up after {status.restarts} restarts (runPolicy.maxRestarts): {failure.message}"
        b.set(C.FAILED, True, R.RESTART_LIMIT, message)
    else:
        b.set(C.FAILED, True, R.WORKER_FAILED, failure.message)
    return _finish(observed, b, Phase.FAILED, now)


def _finish(observed: Observed, b: ConditionBuilder, phase: Phase, now: datetime) -> Decision:
    status, report = observed.status, observed.report or TrainerReport()
    reason = R.JOB_COMPLETED if phase == Phase.SUCCEEDED else R.WORKER_FAILED
    b.set(C.RUNNING, False, reason, f"the job {phase.value.lower()}")
    b.set(C.RESTARTING, False, reason, f"the job {phase.value.lower()}")
    b.set(C.QUEUED, False, reason, f"the job {phase.value.lower()}")
    update: dict[str, Any] = {"phase": phase, "completion_time": rfc3339(now), "workers": _workers(observed.job)}
    # A run that ended before any reconcile saw it running (a short one, its Job updates batched) started when
    # its Job did.
    update["start_time"] = status.start_time or observed.job.start_time
    if report.progress is not None:
        update["progress"] = merge_model(status.progress, Progress, report.progress.to_dict())
    if report.checkpoints is not None:
        update["checkpoints"] = merge_model(status.checkpoints, CheckpointStatus, report.checkpoints.to_dict())
    if report.control is not None:
        update["control"] = merge_model(status.control, ControlStatus, report.control.to_dict())
    return Decision(status=status.model_copy(update=update), cleanup_attempts=tuple(range(1, status.attempt)))


def _observe_running(observed: Observed, b: ConditionBuilder, now: datetime) -> Decision:
    status, run_policy, job = observed.status, observed.run_policy, observed.job
    update: dict[str, Any] = {"workers": _workers(job)}
    if job.suspended:
        # Kueue owns .spec.suspend of a queued Job: waiting for admission, or evicted back into the queue. The
        # same Job resumes when Kueue admits it again, so this is never a failure, a restart or a new attempt.
        kueue = observed.kueue
        if kueue is not None and kueue.evicted:
            b.set(C.QUEUED, True, kueue.reason, f"evicted by Kueue ({kueue.reason}): {kueue.message}")
            b.set(C.RUNNING, False, kueue.reason, f"suspended by Kueue: {kueue.message}")
        else:
            detail = f"; Kueue: {kueue.message}" if kueue is not None and kueue.message else ""
            b.set(C.QUEUED, True, R.AWAITING_ADMISSION, _awaiting(run_policy) + detail)
            b.set(C.RUNNING, False, R.AWAITING_ADMISSION, "suspended by Kueue")
        update["phase"] = Phase.QUEUED
        return Decision(status=status.model_copy(update=update))
    b.set(C.QUEUED, False, R.ADMITTED, "the Job was admitted")
    deadline = job_deadline(run_policy, status.start_time, job.start_time, now)
    if deadline is not None and job.active_deadline_seconds == deadline:
        deadline = None
    if job.ready + job.succeeded >= observed.nodes:
        b.set(C.RUNNING, True, R.PODS_RUNNING, f"{observed.nodes}/{observed.nodes} workers running")
        b.set(C.RESTARTING, False, R.PODS_RUNNING, f"attempt {status.attempt} is running")
        update["phase"] = Phase.RUNNING
        update["start_time"] = status.start_time or job.start_time or rfc3339(now)
    else:
        update["phase"] = Phase.RESTARTING if b.holds(C.RESTARTING) else _waiting_phase_admitted(status)
        starting = f"{job.ready}/{observed.nodes} workers running, none blocked"
        explain_waiting(b, observed.blocked, observed.pods_checked, starting)
    clear = run_policy.active_deadline_seconds is None and job.active_deadline_seconds is not None
    return Decision(status=status.model_copy(update=update), job_deadline=deadline, clear_job_deadline=clear)


def _waiting_phase_admitted(status: TrainingJobStatus) -> Phase:
    return Phase.RUNNING if status.phase == Phase.RUNNING else Phase.PENDING
