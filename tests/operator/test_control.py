"""Control annotations, pure: the request each poll sends, the Stopped outcome, status.control and the kept
checkpoints in the status, and the early poll an annotation change earns."""

from __future__ import annotations

from datetime import UTC, datetime

from kiln.api.contract import REPORT_LIMIT, Annotation, ControlRequest, TrainerReport
from kiln.api.status import ControlStatus, KeptCheckpoint, Phase, TrainingJobStatus
from kiln.api.training import RunPolicy
from kiln.operator.background import Schedule
from kiln.operator.control import control_request
from kiln.operator.progress import progress_patch
from kiln.operator.status import JobView, Observed, next_status

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
STOP = {Annotation.STOP: "true"}


def test_no_annotation_no_request() -> None:
    assert control_request(None, None) is None
    assert control_request({"other": "x", Annotation.STOP: "false"}, None) is None


def test_stop_is_sent_on_every_poll_until_the_run_ends() -> None:
    """A new attempt's rank 0 has heard nothing, so an earlier acknowledgement does not silence the stop."""
    assert control_request(STOP, None) == ControlRequest(stop=True)
    assert control_request(STOP, ControlStatus(stop_requested=True)) == ControlRequest(stop=True)


def test_a_checkpoint_token_is_sent_until_acknowledged() -> None:
    wanted = {Annotation.CHECKPOINT: "t2"}
    assert control_request(wanted, None) == ControlRequest(checkpoint="t2")
    assert control_request(wanted, ControlStatus(checkpoint_acknowledged="t1")) == ControlRequest(checkpoint="t2")
    assert control_request(wanted, ControlStatus(checkpoint_acknowledged="t2")) is None
    both = control_request({**wanted, **STOP}, ControlStatus(checkpoint_acknowledged="t2"))
    assert both == ControlRequest(stop=True)


def test_an_overlong_or_empty_token_is_no_request() -> None:
    assert control_request({Annotation.CHECKPOINT: "x" * 254}, None) is None
    assert control_request({Annotation.CHECKPOINT: ""}, None) is None


def observed(report: TrainerReport) -> Observed:
    status = TrainingJobStatus(phase=Phase.RUNNING, attempt=1)
    job = JobView(exists=True, succeeded=2, complete=True)
    return Observed(generation=1, nodes=2, run_policy=RunPolicy(), status=status, job=job, report=report)


def test_a_run_stopped_on_request_succeeds_with_reason_stopped() -> None:
    report = TrainerReport(
        state="completed",
        stop_reason="stopped on request (kiln.dev/stop) at epoch 1, step 10",
        control=ControlStatus(stop_requested=True, stopped_at_step=10),
    )
    decision = next_status(observed(report), NOW)
    succeeded = next(c for c in decision.status.conditions if c.type == "Succeeded")
    assert decision.status.phase == Phase.SUCCEEDED
    assert (succeeded.status, succeeded.reason) == ("True", "Stopped")
    assert succeeded.message == report.stop_reason
    assert decision.status.control == ControlStatus(stop_requested=True, stopped_at_step=10)


def test_a_stop_that_came_too_late_to_stop_anything_is_a_plain_completion() -> None:
    report = TrainerReport(state="completed", control=ControlStatus(stop_requested=True))
    succeeded = next(c for c in next_status(observed(report), NOW).status.conditions if c.type == "Succeeded")
    assert succeeded.reason == "JobCompleted"


def test_the_poll_copies_control_and_kept_checkpoints_and_keeps_earlier_acknowledgements() -> None:
    before = {"control": {"checkpointAcknowledged": "t1", "checkpoint": "s3://b/step-6/state.pt"}}
    kept = [KeptCheckpoint(uri=f"s3://b/step-{s}/state.pt", epoch=s // 6, step=s, metric=None) for s in (6, 12)]
    report = TrainerReport.model_validate(
        {"checkpoints": {"latest": "s3://b/step-12/state.pt", "kept": [k.to_dict() for k in kept]},
         "control": {"stopRequested": True}}
    )  # fmt: skip
    patch = progress_patch(before, report)
    assert patch["control"] == {"stopRequested": True, "checkpointAcknowledged": "t1",
                                "checkpoint": "s3://b/step-6/state.pt"}  # fmt: skip
    assert [k["step"] for k in patch["checkpoints"]["kept"]] == [6, 12]
    assert progress_patch({**before, **patch}, report) == {}


def test_the_termination_message_drops_the_oldest_kept_checkpoints_to_fit() -> None:
    kept = [{"uri": f"s3://bucket/runs/job/checkpoints/step-{s:09d}/state.pt", "epoch": s, "step": s, "metric": 0.5}
            for s in range(64)]  # fmt: skip
    report = TrainerReport.model_validate({"state": "completed", "checkpoints": {"latest": kept[-1]["uri"],
                                                                                  "kept": kept}})  # fmt: skip
    text = report.to_json()
    assert len(text.encode()) <= REPORT_LIMIT
    trimmed = TrainerReport.model_validate_json(text).checkpoints
    assert trimmed is not None and trimmed.kept is not None and trimmed.kept[-1].step == 63
    assert 0 < len(trimmed.kept) < 64


def test_a_changed_control_annotation_makes_the_poll_due_at_once() -> None:
    schedule = Schedule(60.0, 10.0)
    body = {"metadata": {"name": "a", "annotations": {}}, "status": {"phase": "Running"}}
    schedule.observe("ns", "a", body, now=0.0)
    assert [kind for kind, *_ in schedule.due(0.0, NOW)] == ["progress"]
    assert list(schedule.due(1.0, NOW)) == []
    schedule.observe("ns", "a", {**body, "metadata": {"name": "a", "annotations": {"unrelated": "x"}}}, now=1.0)
    assert list(schedule.due(1.0, NOW)) == []
    schedule.observe("ns", "a", {**body, "metadata": {"name": "a", "annotations": STOP}}, now=1.0)
    assert [kind for kind, *_ in schedule.due(1.0, NOW)] == ["progress"]
