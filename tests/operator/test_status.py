"""The state machine, step by step, with the clock and observations passed in."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

from kiln.api.contract import TrainerReport
from kiln.api.status import ConditionType, Phase, TrainingJobStatus
from kiln.api.training import RunPolicy
from kiln.operator.changes import AppliedSpec, applied_spec
from kiln.operator.conditions import Transition, status_patch
from kiln.operator.failures import Failure
from kiln.operator.handlers import told
from kiln.operator.status import JobView, Observed, job_deadline, job_view, next_status

C = ConditionType
NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def observe(status: TrainingJobStatus, job: JobView | None = None, **kwargs: object) -> Observed:
    policy = kwargs.pop("run_policy", RunPolicy())
    return Observed(
        generation=1,
        nodes=kwargs.pop("nodes", 2),  # type: ignore[arg-type]
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


def test_created_names_only_the_children_made() -> None:
    """A one-node job's ranks share a pod and get no rendezvous Service (render.needs_service)."""
    messages = {nodes: step(TrainingJobStatus(), nodes=nodes).transitions[0].message for nodes in (1, 2)}
    assert messages == {1: "ConfigMap and Job created", 2: "ConfigMap, headless Service and Job created"}


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


def test_a_decision_acts_when_it_creates_deletes_or_patches_a_job_and_not_for_status_alone() -> None:
    """``acts`` decides whether a decision from a watched (maybe stale) body must be made again from a read."""
    assert step(TrainingJobStatus()).acts  # creates attempt 1
    assert step(running(), RUNNING_JOB, run_policy=RunPolicy(suspend=True)).acts  # deletes it
    assert step(running(), RUNNING_JOB, run_policy=RunPolicy(active_deadline_seconds=60)).acts  # its deadline
    created = step(TrainingJobStatus()).status
    assert not step(created, RUNNING_JOB).acts  # Running: a status write only
    assert not step(running(), RUNNING_JOB).acts


def test_complete_job_succeeds_with_final_progress() -> None:
    report = TrainerReport.model_validate(
        {"state": "completed", "progress": {"epoch": 3, "totalEpochs": 3}, "checkpoints": {"best": "s3://b"}}
    )
    done = step(running(), JobView(exists=True, succeeded=2, complete=True), report=report)
    assert done.status.phase == Phase.SUCCEEDED
    assert conditions(done.status)["Succeeded"] == ("True", "JobCompleted")
    assert conditions(done.status)["Running"][0] == "False"
    assert done.status.progress is not None and done.status.progress.epoch == 3
    assert done.status.checkpoints is not None and done.status.checkpoints.best == "s3://b"
    assert done.status.completion_time == "2026-01-01T12:00:00Z"


def test_a_job_that_ends_before_it_was_seen_running_started_when_its_job_did() -> None:
    created = step(TrainingJobStatus()).status
    done = step(created, JobView(exists=True, succeeded=2, complete=True, start_time="2026-01-01T11:59:30Z"))
    assert done.status.phase == Phase.SUCCEEDED
    assert done.status.start_time == "2026-01-01T11:59:30Z"
    assert (
        step(
            running(), JobView(exists=True, succeeded=2, complete=True, start_time="2026-01-01T11:59:59Z")
        ).status.start_time
        == "2026-01-01T11:59:00Z"
    )  # the first start stands


def test_events_tell_what_turned_true_and_leave_the_false_it_implies_to_the_condition() -> None:
    done = step(running(), JobView(exists=True, succeeded=2, complete=True))
    assert {(t.type, t.status) for t in done.transitions} == {(C.SUCCEEDED, "True"), (C.RUNNING, "False")}
    assert [(t.type, t.status, t.reason) for t in told(done.transitions)] == [(C.SUCCEEDED, "True", "JobCompleted")]
    failed = JobView(exists=True, failed=1, failed_reason="PodFailurePolicy")
    restart = step(running(), failed, failure=Failure(retriable=True, message="exit 137"))
    assert (C.RUNNING, "False") in [(t.type, t.status) for t in restart.transitions]
    assert all(t.status == "True" for t in told(restart.transitions)) and told(restart.transitions)
    alone = (Transition(C.QUEUED, "False", "Admitted", "the Job was admitted"),)
    assert told(alone) == alone  # nothing else tells it
    news = (Transition(C.SUCCEEDED, "False", "EpochsRaised", "raised to 5"), Transition(C.SUSPENDED, "True", "x", ""))
    assert told(news) == news  # a False with news of its own stays beside a True
    admitted = step(step(TrainingJobStatus(), run_policy=RunPolicy(queue_name="q")).status, RUNNING_JOB,
                    run_policy=RunPolicy(queue_name="q")).transitions  # fmt: skip
    assert [(t.type, t.status) for t in admitted] == [(C.QUEUED, "False"), (C.RUNNING, "True")]
    assert [(t.type, t.status) for t in told(admitted)] == [(C.RUNNING, "True")]


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
    complete = JobView(exists=True, succeeded=2, complete=True)
    decision = step(running(), complete, report=TrainerReport(state="preempted"))
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


# -- spec changes: what applies when ------------------------------------------------------------------

SPEC: dict[str, object] = {
    "task": "classification",
    "epochs": 3,
    "optimizer": {"name": "adamw", "lr": 0.001},
    "runPolicy": {"maxRestarts": 3},
}


def spec_at(generation: int, **changes: object) -> AppliedSpec:
    spec = {**SPEC, **changes}
    return applied_spec(spec, generation, int(spec["epochs"]))  # type: ignore[call-overload]


def edit(status: TrainingJobStatus, job: JobView, generation: int, **changes: object):
    """One reconcile after the user's edit made `generation` (the Job still runs what it was created with)."""
    observed = replace(
        observe(status, job, **changes.pop("observed", {})),  # type: ignore[arg-type]
        generation=generation,
        wanted=spec_at(generation, **changes),
    )
    return next_status(observed, NOW)


def pending(status: TrainingJobStatus) -> tuple[str, str, str] | None:
    found = next((c for c in status.conditions if c.type == ConditionType.SPEC_CHANGE_PENDING), None)
    return None if found is None else (found.status, found.reason, found.message)


RUNNING_GEN1 = replace(RUNNING_JOB, applied=spec_at(1))


def test_an_optimizer_edit_mid_run_is_pending_until_the_next_attempt() -> None:
    status = running()
    decision = edit(status, RUNNING_GEN1, 2, optimizer={"name": "adamw", "lr": 0.01})
    assert decision.create_attempt is None and decision.delete_attempt is None
    assert decision.status.phase == Phase.RUNNING
    state, reason, message = pending(decision.status) or ("", "", "")
    assert (state, reason) == ("True", "AppliesAtNextAttempt")
    assert message.startswith("optimizer changed in generation 2; attempt 1 runs generation 1")
    assert decision.status.observed_generation == 1  # generation 2 is not in effect
    assert [(t.type, t.status) for t in decision.transitions] == [(ConditionType.SPEC_CHANGE_PENDING, "True")]
    again = edit(decision.status, RUNNING_GEN1, 2, optimizer={"name": "adamw", "lr": 0.01})
    assert again.transitions == () and status_patch(decision.status.to_dict(), again.status) == {}

    # The next attempt (here a retriable failure's restart) is rendered from the current spec: applied.
    failed = replace(RUNNING_GEN1, ready=0, failed=1, failed_reason="PodFailurePolicy")
    restart = edit(
        decision.status, failed, 2, optimizer={"name": "adamw", "lr": 0.01},
        observed={"failure": Failure(retriable=True, message="exit 137")},
    )  # fmt: skip
    assert restart.create_attempt == 2 and restart.status.observed_generation == 2
    assert pending(restart.status) == ("False", "SpecApplied", "attempt 2 runs generation 2")
    second = replace(RUNNING_JOB, applied=spec_at(2, optimizer={"name": "adamw", "lr": 0.01}))
    settled = edit(restart.status, second, 2, optimizer={"name": "adamw", "lr": 0.01})
    assert pending(settled.status) == ("False", "SpecApplied", "attempt 2 runs generation 2")
    assert settled.status.observed_generation == 2


def test_several_sections_are_named_and_reverting_an_edit_clears_it() -> None:
    decision = edit(running(), RUNNING_GEN1, 2, epochs=5, seed=7)
    assert (pending(decision.status) or ("",) * 3)[2].startswith("epochs, seed changed in generation 2")
    reverted = edit(decision.status, RUNNING_GEN1, 3)
    assert pending(reverted.status) == ("False", "SpecApplied", "attempt 1 runs generation 3")
    assert reverted.status.observed_generation == 3


def test_run_policy_the_operator_applies_advances_observed_generation_at_once() -> None:
    status = running()
    applied = edit(status, RUNNING_GEN1, 2, runPolicy={"maxRestarts": 9, "activeDeadlineSeconds": 600})
    assert applied.status.observed_generation == 2 and pending(applied.status) is None
    # queueName is baked into the Job (a Kueue label): it waits for the next attempt like any pod field,
    # and observedGeneration stays at the generation whose runPolicy was applied.
    queued = edit(applied.status, RUNNING_GEN1, 3, runPolicy={"maxRestarts": 9, "queueName": "q"})
    assert (pending(queued.status) or ("",) * 3)[:2] == ("True", "AppliesAtNextAttempt")
    assert "runPolicy changed" in (pending(queued.status) or ("",) * 3)[2]
    assert queued.status.observed_generation == 2


def test_suspend_and_resume_applies_a_pending_change() -> None:
    lr = {"optimizer": {"name": "adamw", "lr": 0.01}}
    changed = edit(running(), RUNNING_GEN1, 2, **lr)
    assert changed.status.observed_generation == 1
    suspended = edit(changed.status, RUNNING_GEN1, 3, **lr, observed={"run_policy": RunPolicy(suspend=True)})
    assert suspended.delete_attempt == 1 and suspended.status.phase == Phase.SUSPENDED
    assert (pending(suspended.status) or ("",) * 3)[:2] == ("False", "SuspendedByUser")
    resumed = edit(suspended.status, JobView(), 4, **lr)
    assert resumed.create_attempt == 2 and resumed.status.observed_generation == 4
    assert pending(resumed.status) == ("False", "SpecApplied", "attempt 2 runs generation 4")


def succeeded() -> TrainingJobStatus:
    report = TrainerReport.model_validate({"state": "completed", "progress": {"epoch": 3, "totalEpochs": 3}})
    return step(running(), replace(RUNNING_GEN1, ready=0, succeeded=2, complete=True), report=report).status


DONE_GEN1 = replace(RUNNING_GEN1, active=0, ready=0, succeeded=2, complete=True)


def test_raising_epochs_on_a_succeeded_job_continues_as_a_new_attempt() -> None:
    done = succeeded()
    assert done.phase == Phase.SUCCEEDED and done.completion_time
    decision = edit(done, DONE_GEN1, 2, epochs=5)
    assert decision.create_attempt == 2
    status = decision.status
    assert status.phase == Phase.PENDING and status.attempt == 2 and status.restarts == 0
    assert status.completion_time is None and status.start_time is None
    assert conditions(status)["Succeeded"] == ("False", "EpochsRaised")
    assert status.observed_generation == 2 and pending(status) is None
    assert (ConditionType.SUCCEEDED, "False") in [(t.type, t.status) for t in decision.transitions]
    assert status_patch(done.to_dict(), status)["completionTime"] is None
    # The new attempt runs and succeeds; then the earlier attempt is cleaned up.
    attempt2 = replace(DONE_GEN1, applied=spec_at(2, epochs=5))
    done_again = edit(status, attempt2, 2, epochs=5)
    assert done_again.status.phase == Phase.SUCCEEDED and done_again.cleanup_attempts == (1,)
    assert conditions(done_again.status)["Succeeded"] == ("True", "JobCompleted")


def test_raising_epochs_while_suspended_waits_for_resume() -> None:
    decision = edit(succeeded(), DONE_GEN1, 2, epochs=5, observed={"run_policy": RunPolicy(suspend=True)})
    assert decision.create_attempt is None and decision.status.phase == Phase.SUSPENDED
    assert conditions(decision.status)["Succeeded"] == ("False", "EpochsRaised")
    resumed = edit(decision.status, DONE_GEN1, 3, epochs=5)
    assert resumed.create_attempt == 2 and conditions(resumed.status)["Suspended"] == ("False", "Resumed")


def test_other_edits_on_a_finished_job_say_they_have_no_effect() -> None:
    done = succeeded()
    for changes, named in (({"optimizer": {"lr": 0.1}}, "optimizer"), ({"epochs": 2}, "epochs")):
        decision = edit(done, DONE_GEN1, 2, **changes)
        assert decision.create_attempt is None and decision.status.phase == Phase.SUCCEEDED
        state, reason, message = pending(decision.status) or ("", "", "")
        assert (state, reason) == ("True", "JobFinished") and message.startswith(f"{named} changed in generation 2")
        assert decision.status.observed_generation == 1
        assert conditions(decision.status)["Succeeded"] == ("True", "JobCompleted")
    # A runPolicy edit the operator applies (ttlSecondsAfterFinished) is in effect at once.
    ttl = edit(done, DONE_GEN1, 2, runPolicy={"maxRestarts": 3, "ttlSecondsAfterFinished": 60})
    assert ttl.status.observed_generation == 2 and pending(ttl.status) is None


def test_a_failed_job_stays_failed_even_when_epochs_are_raised() -> None:
    failed_job = replace(RUNNING_GEN1, ready=0, failed=1, failed_reason="PodFailurePolicy")
    failed = step(running(), failed_job, failure=Failure(retriable=False, message="bad data")).status
    decision = edit(failed, failed_job, 2, epochs=5)
    assert decision.create_attempt is None and decision.status.phase == Phase.FAILED
    assert (pending(decision.status) or ("",) * 3)[:2] == ("True", "JobFinished")


def test_a_change_still_pending_when_the_job_finishes_is_reported_as_not_applied() -> None:
    changed = edit(running(), RUNNING_GEN1, 2, seed=4)
    done = edit(changed.status, DONE_GEN1, 2, seed=4)
    assert done.status.phase == Phase.SUCCEEDED and done.status.observed_generation == 1
    state, reason, message = pending(done.status) or ("", "", "")
    assert (state, reason) == ("True", "JobFinished") and "was not applied before the job succeeded" in message


def test_without_the_jobs_record_a_finished_job_falls_back_to_reported_progress() -> None:
    done = succeeded()  # progress.totalEpochs 3; the Job was deleted
    raised = edit(done, JobView(), 2, epochs=4)
    assert raised.create_attempt == 2
    other = edit(done, JobView(), 2, seed=1)
    assert other.create_attempt is None and (pending(other.status) or ("",) * 3)[:2] == ("True", "JobFinished")
