"""The state machine, step by step, with the clock and observations passed in."""

from __future__ import annotations

from datetime import UTC, datetime

from kiln.api.status import ConditionType, Phase, TrainingJobStatus
from kiln.api.training import RunPolicy
from kiln.operator.failures import Failure, Report
from kiln.operator.status import JobView, Observed, job_deadline, job_view, next_status, status_patch

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def observe(status: TrainingJobStatus, job: JobView | None = None, **kwargs: object) -> Observed:
    policy = kwargs.pop("run_policy", RunPolicy())
    return Observed(
        generation=1,
        nodes=2,
        run_policy=policy,
        status=status,  # type: ignore[arg-type]
        job=job or JobView(),
        **kwargs,
    )  # type: ignore[arg-type]


def conditions(status: TrainingJobStatus) -> dict[str, tuple[str, str]]:
    return {c.type.value: (c.status, c.reason) for c in status.conditions}


def step(status: TrainingJobStatus, job: JobView | None = None, **kwargs: object):
    return next_status(observe(status, job, **kwargs), NOW)


RUNNING_JOB = JobView(exists=True, active=2, ready=2, start_time="2026-01-01T11:59:00Z")


def running() -> TrainingJobStatus:
    first = step(TrainingJobStatus()).status
    return step(first, RUNNING_JOB).status


def test_new_job_creates_attempt_one() -> None:
    decision = step(TrainingJobStatus())
    assert decision.create_attempt == 1
    assert decision.status.attempt == 1 and decision.status.phase == Phase.PENDING
    assert conditions(decision.status) == {"Created": ("True", "ChildrenCreated")}
    assert [t.type for t in decision.transitions] == [ConditionType.CREATED]


def test_all_workers_ready_is_running() -> None:
    status = running()
    assert status.phase == Phase.RUNNING
    assert conditions(status)["Running"] == ("True", "PodsRunning")
    assert status.start_time == "2026-01-01T11:59:00Z"
    assert status.workers.active == 2


def test_repeating_a_decision_changes_nothing() -> None:
    status = running()
    again = step(status, RUNNING_JOB)
    assert again.transitions == () and again.create_attempt is None
    assert status_patch(status.to_dict(), again.status) == {}


def test_complete_job_succeeds_with_final_progress() -> None:
    report = Report(state="completed", progress={"epoch": 3, "totalEpochs": 3}, checkpoints={"best": "s3://b"})
    done = step(running(), JobView(exists=True, succeeded=2, complete=True), report=report)
    assert done.status.phase == Phase.SUCCEEDED
    assert conditions(done.status)["Succeeded"] == ("True", "JobCompleted")
    assert conditions(done.status)["Running"][0] == "False"
    assert done.status.progress is not None and done.status.progress.epoch == 3
    assert done.status.checkpoints is not None and done.status.checkpoints.best == "s3://b"
    assert done.status.completion_time == "2026-01-01T12:00:00Z"


def test_retriable_failure_restarts_the_whole_gang() -> None:
    failed = JobView(exists=True, failed=1, failed_reason="PodFailurePolicy")
    decision = step(running(), failed, failure=Failure(retriable=True, message="exit 137"))
    assert decision.create_attempt == 2
    assert decision.status.attempt == 2 and decision.status.restarts == 1
    assert decision.status.phase == Phase.RESTARTING
    assert conditions(decision.status)["Restarting"] == ("True", "RetriableFailure")
    assert conditions(decision.status)["Running"][0] == "False"


def test_restarts_stop_at_max_restarts() -> None:
    status = running().model_copy(update={"restarts": 1})
    failed = JobView(exists=True, failed=1, failed_reason="PodFailurePolicy")
    decision = step(
        status, failed, failure=Failure(retriable=True, message="exit 137"), run_policy=RunPolicy(max_restarts=1)
    )
    assert decision.status.phase == Phase.FAILED
    assert conditions(decision.status)["Failed"] == ("True", "RestartLimitExceeded")


def test_non_retriable_failure_fails_with_the_message_and_keeps_earlier_attempts_until_the_end() -> None:
    status = running().model_copy(update={"attempt": 3, "restarts": 2})
    failed = JobView(exists=True, failed=1, failed_reason="PodFailurePolicy")
    decision = step(status, failed, failure=Failure(retriable=False, message="bad data in s3://x"))
    assert decision.status.phase == Phase.FAILED
    failed_condition = next(c for c in decision.status.conditions if c.type == ConditionType.FAILED)
    assert failed_condition.reason == "WorkerFailed" and "bad data" in failed_condition.message
    assert decision.cleanup_attempts == (1, 2)
    assert any(t.warning for t in decision.transitions)


def test_preempted_rank0_with_a_complete_job_is_a_restart_not_success() -> None:
    decision = step(running(), JobView(exists=True, succeeded=2, complete=True), report=Report(state="preempted"))
    assert decision.status.phase == Phase.RESTARTING and decision.create_attempt == 2


def test_deadline_exceeded() -> None:
    decision = step(
        running(),
        JobView(exists=True, failed_reason="DeadlineExceeded"),
        run_policy=RunPolicy(active_deadline_seconds=60),
    )
    assert conditions(decision.status)["Failed"] == ("True", "DeadlineExceeded")


def test_suspend_deletes_the_attempt_and_resume_starts_the_next() -> None:
    suspended = step(running(), RUNNING_JOB, run_policy=RunPolicy(suspend=True))
    assert suspended.delete_attempt == 1
    assert suspended.status.phase == Phase.SUSPENDED
    assert conditions(suspended.status)["Suspended"] == ("True", "SuspendedByUser")
    assert conditions(suspended.status)["Running"][0] == "False"
    resumed = step(suspended.status, JobView())
    assert resumed.create_attempt == 2 and resumed.status.restarts == 0
    assert conditions(resumed.status)["Suspended"] == ("False", "Resumed")
    assert resumed.status.start_time is None


def test_created_suspended_starts_nothing() -> None:
    decision = step(TrainingJobStatus(), run_policy=RunPolicy(suspend=True))
    assert decision.create_attempt is None and decision.status.phase == Phase.SUSPENDED


def test_queued_until_kueue_unsuspends_the_job() -> None:
    policy = RunPolicy(queue_name="q")
    created = step(TrainingJobStatus(), run_policy=policy)
    assert created.status.phase == Phase.QUEUED
    assert conditions(created.status)["Queued"] == ("True", "AwaitingAdmission")
    waiting = step(created.status, JobView(exists=True, suspended=True), run_policy=policy)
    assert waiting.status.phase == Phase.QUEUED
    admitted = step(waiting.status, RUNNING_JOB, run_policy=policy)
    assert admitted.status.phase == Phase.RUNNING
    assert conditions(admitted.status)["Queued"] == ("False", "Admitted")


def test_a_deleted_job_is_recreated_under_the_same_name() -> None:
    decision = step(running(), JobView())
    assert decision.create_attempt == 1 and decision.status.attempt == 1


def test_invalid_spec_fails_with_the_field_path() -> None:
    decision = step(TrainingJobStatus(), invalid="spec.epochs: Input should be greater than or equal to 1")
    assert decision.status.phase == Phase.FAILED
    failed = next(c for c in decision.status.conditions if c.type == ConditionType.FAILED)
    assert failed.reason == "InvalidSpec" and "spec.epochs" in failed.message
    assert decision.create_attempt is None
    assert [(t.type, t.warning) for t in decision.transitions] == [(ConditionType.FAILED, True)]


def test_terminal_status_is_left_alone() -> None:
    done = step(running(), JobView(exists=True, complete=True, succeeded=2)).status
    assert step(done, JobView()).status == done


def test_deadline_counts_from_the_first_start_across_attempts() -> None:
    policy = RunPolicy(active_deadline_seconds=600)
    start = "2026-01-01T11:50:00Z"
    assert job_deadline(policy, start, None, NOW) == 1  # spent: never below one second
    assert job_deadline(policy, start, "2026-01-01T11:55:00Z", NOW) == 300
    assert job_deadline(policy, None, None, NOW) == 600
    assert job_deadline(RunPolicy(), start, None, NOW) is None
    changed = step(running(), RUNNING_JOB, run_policy=RunPolicy(active_deadline_seconds=3600))
    assert changed.job_deadline == 3600


def test_job_view_reads_the_batch_job() -> None:
    job = {
        "metadata": {"name": "demo-1"},
        "spec": {"suspend": False, "activeDeadlineSeconds": 5},
        "status": {
            "active": 1,
            "ready": 1,
            "failed": 1,
            "conditions": [{"type": "Failed", "status": "True", "reason": "PodFailurePolicy"}],
        },
    }
    view = job_view(job)
    assert view.exists and view.failed_reason == "PodFailurePolicy" and view.active_deadline_seconds == 5
    assert not job_view({"metadata": {"deletionTimestamp": "x"}}).exists
    assert job_view(None) == JobView()


def test_status_patch_sends_only_changes() -> None:
    old = running()
    new = old.model_copy(update={"restarts": 4})
    assert status_patch(old.to_dict(), new) == {"restarts": 4}
    assert status_patch({**old.to_dict(), "completionTime": "x"}, old) == {"completionTime": None}
