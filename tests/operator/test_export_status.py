"""The ExportJob state machine, step by step, with the clock, the source and the Job passed in."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from kiln.api.contract import ExitCode, ExportReport
from kiln.api.export import ExportJobSpec
from kiln.api.status import Artifact, ConditionType, ExportJobStatus, LatencyMs, Phase, Reason
from kiln.operator.export_status import ExportObserved, SourceView, next_export_status, source_view
from kiln.operator.failures import PodOutcome
from kiln.operator.pending import Blocked
from kiln.operator.status import JobView

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
BEST = "s3://runs/ml/digits/checkpoints/step-000000040/state.pt"
LATEST = "s3://runs/ml/digits/checkpoints/step-000000050/state.pt"


def spec(**source: Any) -> ExportJobSpec:
    return ExportJobSpec.model_validate({"source": source or {"trainingJob": "digits"}}, strict=False)


def observed(status: ExportJobStatus | None = None, **kwargs: Any) -> ExportObserved:
    defaults: dict[str, Any] = {
        "name": "export",
        "namespace": "ml",
        "uid": "uid-e",
        "generation": 1,
        "status": status or ExportJobStatus(),
        "spec": spec(),
        "created_at": NOW - timedelta(seconds=5),
    }
    return ExportObserved(**{**defaults, **kwargs})


def tj(phase: Phase, **kwargs: Any) -> SourceView:
    return SourceView(name="digits", exists=True, phase=phase, **kwargs)


def conditions(status: ExportJobStatus) -> dict[str, tuple[str, str]]:
    return {c.type.value: (c.status, c.reason) for c in status.conditions}


def message(status: ExportJobStatus, type_: ConditionType) -> str:
    return next(c.message for c in status.conditions if c.type == type_)


SUCCEEDED_TJ = tj(Phase.SUCCEEDED, best=BEST, latest=LATEST, run_uri="s3://runs/ml/digits")


def started() -> ExportJobStatus:
    decision = next_export_status(observed(source=SUCCEEDED_TJ), NOW)
    assert decision.create is not None
    return decision.status


# -- source resolution ------------------------------------------------------------------------------------


def test_waits_while_the_trainingjob_runs_and_starts_nothing() -> None:
    decision = next_export_status(observed(source=tj(Phase.RUNNING)), NOW)
    assert decision.create is None and decision.status.phase == Phase.PENDING
    assert conditions(decision.status) == {"WaitingForSource": ("True", "WaitingForSource")}
    assert "TrainingJob digits is Running" in message(decision.status, ConditionType.WAITING_FOR_SOURCE)
    assert decision.status.source_checkpoint is None


def test_a_succeeded_trainingjob_resolves_its_best_checkpoint_and_creates_the_children() -> None:
    waiting = next_export_status(observed(source=tj(Phase.RUNNING)), NOW).status
    decision = next_export_status(observed(waiting, source=SUCCEEDED_TJ), NOW)
    assert decision.create is not None
    assert decision.create.checkpoint_uri == BEST and decision.create.source_training_job == "digits"
    assert decision.create.output_uri == "s3://runs/ml/digits/export/export"  # the TrainingJob's output root
    assert decision.status.source_checkpoint == BEST and decision.status.phase == Phase.PENDING
    assert conditions(decision.status) == {
        "Created": ("True", "ChildrenCreated"),
        "WaitingForSource": ("False", "SourceReady"),
    }


def test_checkpoint_latest_picks_the_latest() -> None:
    decision = next_export_status(
        observed(spec=spec(trainingJob="digits", checkpoint="latest"), source=SUCCEEDED_TJ), NOW
    )
    assert decision.create is not None and decision.create.checkpoint_uri == LATEST


def test_an_explicit_checkpoint_uri_starts_at_once() -> None:
    decision = next_export_status(observed(spec=spec(checkpointUri="s3://bucket/any/state.pt")), NOW)
    assert decision.create is not None and decision.create.checkpoint_uri == "s3://bucket/any/state.pt"
    assert decision.create.output_uri == "s3://bucket/any/export/export"
    assert conditions(decision.status) == {"Created": ("True", "ChildrenCreated")}


def test_a_failed_trainingjob_fails_the_export_with_its_reason() -> None:
    waiting = next_export_status(observed(source=tj(Phase.RUNNING)), NOW).status
    source = tj(Phase.FAILED, failure="WorkerFailed: pod digits-1-0 exited with code 2")
    decision = next_export_status(observed(waiting, source=source), NOW)
    assert decision.create is None and decision.status.phase == Phase.FAILED
    assert conditions(decision.status) == {
        "WaitingForSource": ("False", "SourceFailed"),
        "Failed": ("True", "SourceFailed"),
    }
    assert "exited with code 2" in message(decision.status, ConditionType.FAILED)
    assert decision.status.completion_time == "2026-01-01T12:00:00Z"


def test_a_missing_trainingjob_is_waited_for_then_fails_as_source_not_found() -> None:
    created = NOW - timedelta(seconds=30)
    early = next_export_status(observed(source=SourceView(name="digits"), created_at=created), NOW)
    assert early.status.phase == Phase.PENDING and early.create is None
    assert "does not exist (yet)" in message(early.status, ConditionType.WAITING_FOR_SOURCE)
    late = next_export_status(observed(early.status, source=SourceView(name="digits"), created_at=created),
                              NOW + timedelta(seconds=31))  # fmt: skip
    assert late.status.phase == Phase.FAILED
    assert conditions(late.status)["Failed"] == ("True", "SourceNotFound")
    assert "does not exist in namespace ml" in message(late.status, ConditionType.FAILED)


def test_a_trainingjob_deleted_while_waited_for_fails_the_export() -> None:
    body = {"metadata": {"name": "digits", "deletionTimestamp": "2026-01-01T11:00:00Z"}, "status": {"phase": "Running"}}
    source = source_view("digits", body)
    assert not source.exists
    decision = next_export_status(observed(source=source, created_at=NOW - timedelta(hours=1)), NOW)
    assert conditions(decision.status)["Failed"] == ("True", "SourceNotFound")


def test_a_succeeded_trainingjob_without_a_best_checkpoint_says_to_use_latest() -> None:
    decision = next_export_status(observed(source=tj(Phase.SUCCEEDED, latest=LATEST)), NOW)
    assert conditions(decision.status)["Failed"] == ("True", "SourceNotFound")
    assert "checkpoint: latest" in message(decision.status, ConditionType.FAILED)


def test_source_view_reads_the_trainingjob_status() -> None:
    body = {
        "metadata": {"name": "digits"},
        "status": {
            "phase": "Failed",
            "checkpoints": {"latest": LATEST},
            "conditions": [{"type": "Failed", "status": "True", "reason": "RestartLimitExceeded", "message": "137"}],
        },
    }
    view = source_view("digits", body, "s3://runs/ml/digits")
    assert (view.exists, view.phase, view.latest, view.best) == (True, Phase.FAILED, LATEST, None)
    assert view.failure == "RestartLimitExceeded: 137" and view.run_uri == "s3://runs/ml/digits"


def test_an_invalid_spec_fails_as_invalid_spec() -> None:
    decision = next_export_status(observed(spec=None, invalid="spec.formats: formats must not repeat"), NOW)
    assert decision.invalid and decision.status.phase == Phase.FAILED
    assert conditions(decision.status) == {"Failed": ("True", "InvalidSpec")}


# -- the Job ----------------------------------------------------------------------------------------------


def test_a_ready_pod_is_running_and_a_deleted_job_is_created_again_from_the_pinned_checkpoint() -> None:
    status = started()
    running = next_export_status(observed(status, job=JobView(exists=True, active=1, ready=1)), NOW).status
    assert running.phase == Phase.RUNNING and running.start_time == "2026-01-01T12:00:00Z"
    assert conditions(running)["Running"] == ("True", "PodsRunning")
    again = next_export_status(observed(running, source=SourceView(name="digits")), NOW)  # the TJ is gone by now
    assert again.create is not None and again.create.checkpoint_uri == BEST
    assert again.transitions == ()


def test_an_exporter_pod_that_cannot_start_is_told_then_its_start() -> None:
    status, pending = started(), JobView(exists=True, active=1)
    why = Blocked("ImagePullBackOff", 'pod export-x1, container exporter: Back-off pulling image "kiln/trainer:typo"')
    stuck = next_export_status(observed(status, job=pending, pods_checked=True, blocked=why), NOW)
    assert stuck.status.phase == Phase.PENDING and conditions(stuck.status)["Running"] == ("False", "ImagePullBackOff")
    assert message(stuck.status, ConditionType.RUNNING) == why.message
    assert [(t.reason, t.warning) for t in stuck.transitions] == [("ImagePullBackOff", True)]
    freed = next_export_status(observed(stuck.status, job=pending, pods_checked=True), NOW)
    assert conditions(freed.status)["Running"] == ("False", "PodsStarting") and freed.transitions[0].warning is False
    assert "Running" not in conditions(next_export_status(observed(status, job=pending, pods_checked=True), NOW).status)


def artifact(**fields: Any) -> Artifact:
    values: dict[str, Any] = {"format": "onnx", "uri": "s3://runs/ml/digits/export/export/model.onnx",
                              "size_bytes": 1000, "sha256": "a" * 64, "verified": True, "max_abs_diff": 2e-6,
                              "latency_ms": {"1": LatencyMs(p50=0.5, p95=0.7)}, "speedup": {"1": 2.0}}  # fmt: skip
    return Artifact(**{**values, **fields})


def report(**fields: Any) -> ExportReport:
    values: dict[str, Any] = {
        "state": "completed",
        "condition_reason": Reason.EXPORTED,
        "exit_code": ExitCode.OK,
        "source_checkpoint": BEST,
        "source_sha256": "b" * 64,
        "exported_weights": "ema",
        "verification_inputs": "validation",
        "reference_latency_ms": {"1": LatencyMs(p50=1.0, p95=1.2)},
        "artifacts": [
            artifact(),
            artifact(
                quantization="dynamic", verified=None, recommended=False, not_recommended_reason="slower than fp32"
            ),
        ],
    }
    return ExportReport(**{**values, **fields})


def test_a_complete_job_copies_the_report_into_status() -> None:
    job = JobView(exists=True, succeeded=1, complete=True, start_time="2026-01-01T11:59:00Z")
    decision = next_export_status(observed(started(), job=job, report=report()), NOW)
    status = decision.status
    assert status.phase == Phase.SUCCEEDED and conditions(status)["Succeeded"] == ("True", "Exported")
    assert message(status, ConditionType.SUCCEEDED) == (
        "exported and verified: onnx, max abs diff 2e-06; onnx (dynamic int8), max abs diff 2e-06, "
        "not recommended: slower than fp32"
    )
    assert (status.source_sha256, status.exported_weights, status.verification_inputs) == (
        "b" * 64,
        "ema",
        "validation",
    )
    assert status.reference_latency_ms["1"].p50 == 1.0
    assert status.artifacts[0].verified is True and status.artifacts[0].speedup == {"1": 2.0}
    assert status.verified is True  # the quantized artifact (verified unset) does not count
    assert status.start_time == "2026-01-01T11:59:00Z" and status.completion_time == "2026-01-01T12:00:00Z"
    assert next_export_status(observed(status, job=job, report=None), NOW).status == status  # final


def test_a_failed_verification_fails_with_the_reports_reason_and_keeps_its_numbers() -> None:
    failed = report(state="failed", condition_reason=Reason.VERIFICATION_FAILED, exit_code=ExitCode.VERIFICATION_FAILED,
                    reason="onnx: max abs diff 0.02 > verify.tolerance 0.0001",
                    artifacts=[artifact(), artifact(format="pt2", verified=False, max_abs_diff=0.02)])  # fmt: skip
    job = JobView(exists=True, failed=1, failed_reason="PodFailurePolicy")
    pod = PodOutcome(name="export-export-abcde", index=0, exit_code=3, message=failed.to_json())
    status = next_export_status(observed(started(), job=job, pod=pod, report=failed), NOW).status
    assert status.phase == Phase.FAILED
    assert conditions(status)["Failed"] == ("True", "VerificationFailed")
    assert message(status, ConditionType.FAILED) == "onnx: max abs diff 0.02 > verify.tolerance 0.0001 (exit code 3)"
    assert [a.max_abs_diff for a in status.artifacts] == [2e-6, 0.02] and status.verified is False


def test_signals_exhaust_the_jobs_retries_as_restart_limit_exceeded() -> None:
    status = started()
    retrying = JobView(exists=True, active=1, ready=1, failed=1)
    running = next_export_status(observed(status, job=retrying), NOW).status
    assert "retry 1/3" in message(running, ConditionType.RUNNING)
    job = JobView(exists=True, failed=4, failed_reason="BackoffLimitExceeded")
    pod = PodOutcome(name="export-export-xyz", index=0, exit_code=137, pod_reason="OOMKilled")
    final = next_export_status(observed(running, job=job, pod=pod), NOW).status
    assert conditions(final)["Failed"] == ("True", "RestartLimitExceeded")
    assert "exited with code 137 (OOMKilled)" in message(final, ConditionType.FAILED)
    assert conditions(final)["Running"] == ("False", "RestartLimitExceeded")


def test_a_crash_without_a_report_names_the_log_tail() -> None:
    job = JobView(exists=True, failed=1, failed_reason="PodFailurePolicy")
    pod = PodOutcome(name="p", index=0, exit_code=1, message="Traceback ...\nImportError: onnxscript")
    status = next_export_status(observed(started(), job=job, pod=pod), NOW).status
    assert conditions(status)["Failed"] == ("True", "ExportFailed")
    assert message(status, ConditionType.FAILED) == "pod p exited with code 1: Traceback ...\nImportError: onnxscript"


def test_exit_0_without_a_report_is_not_called_a_success() -> None:
    job = JobView(exists=True, succeeded=1, complete=True)
    status = next_export_status(observed(started(), job=job), NOW).status
    assert conditions(status)["Failed"] == ("True", "ExportFailed")


def test_repeating_a_decision_changes_nothing() -> None:
    first = next_export_status(observed(source=tj(Phase.RUNNING)), NOW)
    again = next_export_status(replace(observed(first.status, source=tj(Phase.RUNNING))), NOW + timedelta(seconds=9))
    assert again.status == first.status and again.transitions == ()
