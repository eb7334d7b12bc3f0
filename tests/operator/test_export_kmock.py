"""ExportJobs through the operator's real kopf registry, in-process, against kmock (see test_handlers_kmock).

kmock runs no controllers: the tests play the TrainingJob's progress by patching its status, and the Job
controller and the kubelet by patching the export Job's status and posting the exporter pod with its
termination message, so the operator sees each change through its watches as it would on a cluster.
"""

from __future__ import annotations

from typing import Any

import kmock
import pytest
from test_handlers_kmock import NS, TJ, create_tj, events, operator, phase_of, send, stored, until

from kiln.api.contract import ExportReport
from kiln.api.status import Artifact
from kiln.operator import labels as L
from kiln.operator.handlers import Context

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(30)]
__all__ = ["operator"]  # the fixture, shared with test_handlers_kmock

EJ = f"/apis/kiln.dev/v1alpha1/namespaces/{NS}/exportjobs"
JOBS = f"/apis/batch/v1/namespaces/{NS}/jobs"
BEST = "s3://runs/ml/demo/checkpoints/step-000000040/state.pt"
CHILD = L.export_child_name("export")


async def create_ej(server: kmock.KubernetesEmulator, **source: Any) -> None:
    document = {
        "apiVersion": "kiln.dev/v1alpha1",
        "kind": "ExportJob",
        # kmock fills in none of these; a real apiserver does.
        "metadata": {
            "name": "export",
            "namespace": NS,
            "uid": "uid-export",
            "generation": 1,
            "creationTimestamp": "2026-01-01T00:00:00Z",
        },
        "spec": {"source": source or {"trainingJob": "demo"}, "storage": {"secretRef": "s3-creds"}},
    }
    await send(server, "POST", EJ, document)


def ej_status(server: kmock.KubernetesEmulator) -> dict[str, Any]:
    return (stored(server, "exportjobs", "export") or {}).get("status") or {}


def ej_condition(server: kmock.KubernetesEmulator, type_: str) -> dict[str, Any]:
    return next((c for c in ej_status(server).get("conditions") or [] if c["type"] == type_), {})


async def test_an_export_waits_for_its_trainingjob_then_runs_and_reports_its_artifacts(
    kmock: kmock.KubernetesEmulator, operator: Context
) -> None:
    await create_tj(kmock)
    await until(lambda: phase_of(kmock) == "Pending", "the TrainingJob Pending")
    await create_ej(kmock)
    await until(lambda: ej_condition(kmock, "WaitingForSource").get("status") == "True", "WaitingForSource")
    assert "TrainingJob demo is Pending" in ej_condition(kmock, "WaitingForSource")["message"]
    assert stored(kmock, "jobs", CHILD) is None

    # The TrainingJob succeeds: its status change wakes the waiting export (test_export_wake.py) before the resync.
    checkpoints = {"best": BEST, "latest": BEST}
    await send(kmock, "PATCH", f"{TJ}/demo/status", {"status": {"phase": "Succeeded", "checkpoints": checkpoints}})
    job = await until(lambda: stored(kmock, "jobs", CHILD), "the export Job")
    assert job["metadata"]["ownerReferences"][0]["uid"] == "uid-export"
    await until(lambda: stored(kmock, "configmaps", CHILD), "the export ConfigMap")  # created beside the Job
    await until(lambda: ej_status(kmock).get("sourceCheckpoint") == BEST, "the pinned checkpoint")
    assert ej_condition(kmock, "WaitingForSource")["status"] == "False"

    artifact = Artifact(format="onnx", uri="s3://runs/ml/demo/export/export/model.onnx", size_bytes=10,
                        sha256="c" * 64, verified=True, max_abs_diff=1e-6)  # fmt: skip
    report = ExportReport(state="completed", source_checkpoint=BEST, source_sha256="d" * 64, artifacts=[artifact])
    terminated = {"exitCode": 0, "message": report.to_json(), "finishedAt": "2026-01-01T00:01:00Z"}
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": f"{CHILD}-abcde", "namespace": NS, "labels": {L.EXPORT_JOB: "export"}},
        "status": {
            "phase": "Succeeded",
            "containerStatuses": [{"name": "exporter", "state": {"terminated": terminated}}],
        },
    }
    await send(kmock, "POST", f"/api/v1/namespaces/{NS}/pods", pod)
    complete = [{"type": "Complete", "status": "True", "reason": "CompletionsReached"}]
    await send(kmock, "PATCH", f"{JOBS}/{CHILD}/status", {"status": {"succeeded": 1, "conditions": complete}})
    await until(lambda: ej_status(kmock).get("phase") == "Succeeded", "the export Succeeded")
    status = ej_status(kmock)
    assert status["artifacts"][0]["verified"] is True and status["sourceSha256"] == "d" * 64
    assert ej_condition(kmock, "Succeeded")["reason"] == "Exported"


async def test_a_failed_trainingjob_fails_the_waiting_export(
    kmock: kmock.KubernetesEmulator, operator: Context
) -> None:
    await create_tj(kmock)
    await until(lambda: phase_of(kmock) == "Pending", "the TrainingJob Pending")
    await create_ej(kmock)
    await until(lambda: ej_condition(kmock, "WaitingForSource").get("status") == "True", "WaitingForSource")
    failed = [{"type": "Failed", "status": "True", "reason": "WorkerFailed", "message": "exit code 2",
               "lastTransitionTime": "2026-01-01T00:00:00Z"}]  # fmt: skip
    await send(kmock, "PATCH", f"{TJ}/demo/status", {"status": {"phase": "Failed", "conditions": failed}})
    await until(lambda: ej_status(kmock).get("phase") == "Failed", "the export Failed")
    assert ej_condition(kmock, "Failed")["reason"] == "SourceFailed"
    assert "WorkerFailed: exit code 2" in ej_condition(kmock, "Failed")["message"]
    assert stored(kmock, "jobs", CHILD) is None
    # The background resync that the TrainingJob's change woke posts the transition's Event too.
    await until(lambda: any(e["reason"] == "SourceFailed" for e in events(kmock)), "the SourceFailed Event")


async def test_a_missing_trainingjob_fails_after_the_grace_period_and_an_explicit_uri_starts_at_once(
    kmock: kmock.KubernetesEmulator, operator: Context
) -> None:
    await create_ej(kmock, trainingJob="nowhere")  # created long before the grace period (60 s) ran out
    await until(lambda: ej_status(kmock).get("phase") == "Failed", "the export Failed")
    assert ej_condition(kmock, "Failed")["reason"] == "SourceNotFound"
    assert "TrainingJob nowhere does not exist" in ej_condition(kmock, "Failed")["message"]

    await send(kmock, "DELETE", f"{EJ}/export", {})
    await until(lambda: stored(kmock, "exportjobs", "export") is None, "the ExportJob deleted")
    await create_ej(kmock, checkpointUri=BEST)
    job = await until(lambda: stored(kmock, "jobs", CHILD), "the export Job")
    assert job["spec"]["template"]["spec"]["containers"][0]["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]
