from __future__ import annotations

import json
from typing import Any

from kiln.api.contract import ExitCode, TrainerReport, parse_report
from kiln.api.status import CheckpointStatus
from kiln.operator.failures import classify, message_text, rank0_report


def pod(
    index: int,
    exit_code: int | None = None,
    message: str = "",
    finished: str = "2026-01-01T00:00:10Z",
    disrupted: bool = False,
) -> dict[str, Any]:
    state: dict[str, Any] = {}
    if exit_code is not None:
        state = {"terminated": {"exitCode": exit_code, "message": message, "finishedAt": finished}}
    conditions = [{"type": "DisruptionTarget", "status": "True"}] if disrupted else []
    return {
        "metadata": {
            "name": f"demo-1-{index}",
            "annotations": {"batch.kubernetes.io/job-completion-index": str(index)},
        },
        "status": {
            "phase": "Failed",
            "conditions": conditions,
            "containerStatuses": [{"name": "trainer", "state": state}],
        },
    }


def test_signal_exit_is_retriable() -> None:
    failure = classify([pod(0, 0), pod(1, 137)], {}, [])
    assert failure.retriable and failure.exit_code == 137
    assert "demo-1-1" in failure.message and "137" in failure.message


def test_invalid_input_is_final_and_carries_the_termination_message() -> None:
    message = json.dumps({"state": "failed", "reason": "data.train.uri: no such bucket", "exitCode": 2})
    failure = classify([pod(0, 2, message)], {}, [])
    assert not failure.retriable
    assert "data.train.uri: no such bucket" in failure.message


def test_listed_exit_codes_are_retriable() -> None:
    assert classify([pod(0, 1)], {}, [1]).retriable
    assert not classify([pod(0, 1)], {}, [3]).retriable


def test_disruption_wins_over_later_peer_errors() -> None:
    failure = classify([pod(0, 1, finished="2026-01-01T00:00:01Z"), pod(1, disrupted=True)], {}, [])
    assert failure.retriable


def test_earliest_failure_is_the_cause() -> None:
    early, late = "2026-01-01T00:00:01Z", "2026-01-01T00:00:30Z"
    assert classify([pod(0, 1, finished=late), pod(1, 137, finished=early)], {}, []).retriable
    assert not classify([pod(0, 137, finished=late), pod(1, 2, finished=early)], {}, []).retriable
    # A tie goes to the failure that retrying cannot fix.
    assert not classify([pod(0, 137, finished=early), pod(1, 2, finished=early)], {}, []).retriable


def test_a_rank_reporting_invalid_input_settles_it_even_after_an_earlier_retriable_exit() -> None:
    invalid = json.dumps({"state": "failed", "reason": "data.train.uri: s3://b/x holds no objects", "exitCode": 2})
    early, late = "2026-01-01T00:00:01Z", "2026-01-01T00:00:02Z"
    failure = classify([pod(0, 1, invalid, finished=late), pod(1, 1, "lost rank 0", finished=early)], {}, [1])
    assert not failure.retriable and failure.exit_code == 2
    assert "demo-1-0" in failure.message and "holds no objects" in failure.message


def test_trainer_exit_code_in_the_message_beats_torchruns_exit_1() -> None:
    message = json.dumps({"state": "failed", "reason": "boom", "exitCode": 2})
    failure = classify([pod(0, 1, message)], {}, [1])
    assert not failure.retriable and failure.exit_code == 2
    # The message says why exit 1, listed as retriable, was not retried.
    assert "exited with code 1 (the trainer's exit code: 2): boom" in failure.message


def test_pods_gone_falls_back_to_the_job_condition() -> None:
    job = {
        "status": {
            "conditions": [
                {
                    "type": "Failed",
                    "status": "True",
                    "reason": "PodFailurePolicy",
                    "message": "Container trainer for pod ml/demo-1-0 failed with exit code 2",
                }
            ]
        }
    }
    failure = classify([], job, [])
    assert not failure.retriable and "exit code 2" in failure.message


def test_pods_gone_while_the_job_is_only_a_failure_target_still_names_the_cause() -> None:
    """An evicted pod is deleted once it exits; the Job says FailureTarget until its other pods terminate."""
    message = "Pod ml/demo-1-1 has condition DisruptionTarget matching FailJob rule at index 0"
    job = {"status": {"conditions": [
        {"type": "FailureTarget", "status": "True", "reason": "PodFailurePolicy", "message": message}]}}  # fmt: skip
    failure = classify([], job, [])
    assert failure.retriable and failure.message == f"PodFailurePolicy: {message}"


def test_reports_parse_json_or_keep_raw_text() -> None:
    preempted = parse_report('{"state": "preempted", "progress": {"epoch": 2}}')
    assert preempted is not None and preempted.state == "preempted" and preempted.progress is not None
    assert preempted.progress.epoch == 2
    assert parse_report("Traceback: boom") is None
    assert message_text("Traceback: boom") == "Traceback: boom"
    assert message_text('{"state":"failed","reason":"bad data","exitCode":2}') == "bad data"
    assert parse_report("") is None
    assert parse_report('{"state": "exploded"}') is None, "a state the contract does not know is not a report"
    report = rank0_report(
        [pod(1, 0, '{"state":"completed"}'), pod(0, 0, '{"state":"completed","checkpoints":{"latest":"s3://x"}}')]
    )
    assert report is not None and report.checkpoints == CheckpointStatus(latest="s3://x")


def test_the_report_round_trips_through_the_contract_and_stays_under_the_limit() -> None:
    """What the trainer writes (TrainerReport.to_json) is what the operator and kiln run parse back."""
    failure = TrainerReport.failure("data.train: s3://b/x is empty\n  (check the prefix)", ExitCode.INVALID)
    parsed = parse_report(failure.to_json())
    assert parsed == failure and parsed.exit_code is ExitCode.INVALID
    assert "\n" not in (parsed.reason or ""), "the reason is one line"
    metrics = {f"train/{'m' * 100}{i:02d}": 1.0 for i in range(60)} | {"val/accuracy": 0.9}
    big = TrainerReport.model_validate({"state": "completed", "progress": {"epoch": 1, "metrics": metrics}})
    text = big.to_json()
    assert len(text.encode()) <= 4000
    kept = parse_report(text)
    assert kept is not None and kept.progress is not None and "val/accuracy" in kept.progress.metrics
