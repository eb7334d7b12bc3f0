"""The sample objects of the Argo CD health check's tests (health/testdata/), made by the operator's own state machines.

Each sample is an example manifest from examples/ with the status the operator would write at one point of the job's
life, produced by ``next_status`` / ``next_export_status`` from what a reconcile observes. So the samples carry real
phases, conditions, reasons and messages, and cannot drift from the operator: test_argocd_health checks that the
committed files equal these. Regenerate them with ``.venv/bin/python tests/gitops/health_samples.py``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml

from kiln.api.contract import ExitCode, ExportReport, TrainerReport
from kiln.api.export import ExportJobSpec
from kiln.api.status import Artifact, ExportJobStatus, LatencyMs, Phase, Progress, Reason, TrainingJobStatus
from kiln.api.training import RunPolicy
from kiln.operator.changes import applied_spec
from kiln.operator.export_status import ExportObserved, SourceView, next_export_status
from kiln.operator.failures import Failure
from kiln.operator.status import JobView, Observed, next_status

REPO = Path(__file__).resolve().parents[2]
TESTDATA = Path(__file__).with_name("health") / "testdata"
NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
Obj = dict[str, Any]


def _manifest(example: str) -> Obj:
    document: Obj = yaml.safe_load((REPO / "examples" / example).read_text())
    document["metadata"].update(namespace="ml", uid=f"uid-{document['metadata']['name']}", generation=1)
    return document


TRAINING = _manifest("trainingjob-classification.yaml")
EXPORT = _manifest("exportjob.yaml")
NODES = TRAINING["spec"]["resources"]["nodes"]
BEST = "s3://kiln-runs/flowers-resnet18/checkpoints/step-000012000/state.pt"


# -- TrainingJob ---------------------------------------------------------------------------------------------------


def _applied(generation: int = 1, epochs: int | None = None) -> Any:
    return applied_spec(TRAINING["spec"], generation, epochs or TRAINING["spec"]["epochs"])


def _observe(status: TrainingJobStatus, job: JobView | None = None, **kwargs: Any) -> TrainingJobStatus:
    observed = Observed(
        generation=kwargs.pop("generation", 1),
        nodes=NODES,
        run_policy=kwargs.pop("run_policy", RunPolicy()),
        status=status,
        job=job or JobView(),
        wanted=kwargs.pop("wanted", _applied()),
        **kwargs,
    )
    return next_status(observed, NOW).status


def _job(**fields: Any) -> JobView:
    return JobView(exists=True, start_time="2026-11-30T11:00:00Z", applied=_applied(), **fields)


def _pending() -> TrainingJobStatus:
    return _observe(TrainingJobStatus())


def _running() -> TrainingJobStatus:
    status = _observe(_pending(), _job(active=NODES, ready=NODES))
    progress = Progress(epoch=7, total_epochs=30, step=2100, percent=23.3, metrics={"train/loss": 0.81})
    return status.model_copy(update={"progress": progress})


def _succeeded() -> TrainingJobStatus:
    report = TrainerReport.model_validate(
        {
            "state": "completed",
            "progress": {"epoch": 30, "totalEpochs": 30, "step": 9000, "percent": 100.0},
            "checkpoints": {"best": BEST, "latest": BEST},
        }
    )
    return _observe(_running(), _job(succeeded=NODES, complete=True), report=report)


def _failed_attempt(retriable: bool, message: str, **kwargs: Any) -> TrainingJobStatus:
    failure = Failure(retriable=retriable, message=message, exit_code=137 if retriable else 1)
    return _observe(_running(), _job(failed=1, failed_reason="PodFailurePolicy"), failure=failure, **kwargs)


def _edited_after_success() -> TrainingJobStatus:
    """optimizer.lr changed on a Succeeded job: the operator says the edit will never run."""
    edited = copy.deepcopy(TRAINING["spec"])
    edited["optimizer"]["lr"] = 0.0005
    wanted = applied_spec(edited, 2, edited["epochs"])
    return _observe(_succeeded(), _job(succeeded=NODES, complete=True), generation=2, wanted=wanted)


TRAINING_STATUSES: dict[str, Callable[[], TrainingJobStatus | None]] = {
    "trainingjob-new": lambda: None,
    "trainingjob-pending": _pending,
    "trainingjob-queued": lambda: _observe(TrainingJobStatus(), run_policy=RunPolicy(queue_name="gpu-a100")),
    "trainingjob-running": _running,
    "trainingjob-restarting": lambda: _failed_attempt(True, "pod flowers-resnet18-1-1 was killed by signal 9"),
    "trainingjob-suspended": lambda: _observe(
        _running(), _job(active=NODES, ready=NODES), run_policy=RunPolicy(suspend=True)
    ),
    "trainingjob-succeeded": _succeeded,
    "trainingjob-failed": lambda: _failed_attempt(False, "rank 0 exited with code 1: KeyError: 'label'"),
    "trainingjob-succeeded-edited": _edited_after_success,
    # spec.epochs raised in Git and applied, before the operator's next reconcile: still the old status.
    "trainingjob-succeeded-epochs-raised-unseen": _succeeded,
}
GENERATIONS = {"trainingjob-succeeded-edited": 2, "trainingjob-succeeded-epochs-raised-unseen": 2}


# -- ExportJob -----------------------------------------------------------------------------------------------------


def _export_observe(status: ExportJobStatus, **kwargs: Any) -> ExportJobStatus:
    observed = ExportObserved(
        name=EXPORT["metadata"]["name"],
        namespace="ml",
        uid=EXPORT["metadata"]["uid"],
        generation=1,
        status=status,
        spec=ExportJobSpec.model_validate(EXPORT["spec"], strict=False),
        created_at=NOW - timedelta(seconds=5),
        **kwargs,
    )
    return next_export_status(observed, NOW).status


def _source(phase: Phase, **fields: Any) -> SourceView:
    return SourceView(name=TRAINING["metadata"]["name"], exists=True, phase=phase, **fields)


def _export_created() -> ExportJobStatus:
    succeeded = _source(Phase.SUCCEEDED, best=BEST, run_uri="s3://kiln-runs/flowers-resnet18")
    return _export_observe(ExportJobStatus(), source=succeeded)


def _export_job(**fields: Any) -> JobView:
    return JobView(exists=True, start_time="2026-11-30T11:58:00Z", **fields)


def _export_succeeded() -> ExportJobStatus:
    artifact = Artifact(
        format="onnx",
        uri="s3://kiln-runs/flowers-resnet18/export/flowers-resnet18-export/model.onnx",
        size_bytes=44_700_000,
        sha256="a" * 64,
        exporter="dynamo",
        verified=True,
        max_abs_diff=3e-6,
        latency_ms={"1": LatencyMs(p50=4.1, p95=4.6)},
        speedup={"1": 1.9},
    )
    report = ExportReport(
        state="completed",
        condition_reason=Reason.EXPORTED,
        exit_code=ExitCode.OK,
        source_checkpoint=BEST,
        source_sha256="b" * 64,
        exported_weights="ema",
        verification_inputs="validation",
        artifacts=[artifact],
    )
    return _export_observe(_export_created(), job=_export_job(succeeded=1, complete=True), report=report)


GAVE_UP = "RestartLimitExceeded: gave up after 3 restarts"
EXPORT_STATUSES: dict[str, Callable[[], ExportJobStatus | None]] = {
    "exportjob-new": lambda: None,
    "exportjob-waiting-for-source": lambda: _export_observe(ExportJobStatus(), source=_source(Phase.RUNNING)),
    "exportjob-created": _export_created,
    "exportjob-running": lambda: _export_observe(_export_created(), job=_export_job(active=1, ready=1)),
    "exportjob-succeeded": _export_succeeded,
    "exportjob-failed": lambda: _export_observe(
        ExportJobStatus(),
        source=replace(_source(Phase.FAILED), failure="RestartLimitExceeded: gave up after 3 restarts"),
    ),
}


def samples() -> dict[str, Obj]:
    """Every sample object, by testdata file stem."""
    made: dict[str, Obj] = {}
    for statuses, manifest in ((TRAINING_STATUSES, TRAINING), (EXPORT_STATUSES, EXPORT)):
        for name, status_of in statuses.items():
            document = copy.deepcopy(manifest)
            document["metadata"]["generation"] = GENERATIONS.get(name, 1)
            if (status := status_of()) is not None:
                document["status"] = status.to_dict()
            made[name] = document
    return made


def render(document: Obj) -> str:
    return yaml.safe_dump(document, sort_keys=False, width=120)


def write() -> None:
    TESTDATA.mkdir(parents=True, exist_ok=True)
    for stale in TESTDATA.glob("*.yaml"):
        stale.unlink()
    for name, document in samples().items():
        (TESTDATA / f"{name}.yaml").write_text(render(document))


if __name__ == "__main__":
    write()
