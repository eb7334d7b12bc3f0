"""ExportJobs against the real control plane, the operator running as a ServiceAccount bound to exactly the shipped
RBAC rules (conftest.operator_kubeconfig).

As in test_cluster.py, pods pinned to a node that does not exist stay Pending until a test writes their status the
way a kubelet would: the trainer's final report for the source TrainingJob, the exporter's ExportReport (or exit
code) for the export, which the real Job controller then judges with the rendered podFailurePolicy.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from operator_process import OperatorProcess
from test_cluster import NOWHERE, attempt_pods, condition, create_tj, now, set_terminated, wait_phase

from kiln.api.contract import ExitCode, ExportReport
from kiln.api.status import Artifact, Reason
from kiln.testing.controlplane import ControlPlane
from kiln.testing.kube import MERGE, KubeClient, namespaced
from kiln.testing.processes import wait_until

pytestmark = [pytest.mark.controlplane, pytest.mark.timeout(120)]

BEST = "s3://runs/ml/demo/checkpoints/step-000000030/state.pt"
FINAL = {"state": "completed", "progress": {"epoch": 3, "totalEpochs": 3, "percent": 100.0},
         "checkpoints": {"latest": BEST, "best": BEST, "bestMetric": 0.9}}  # fmt: skip


def ej_path(ns: str, name: str = "") -> str:
    return f"/apis/kiln.dev/v1alpha1/namespaces/{ns}/exportjobs" + (f"/{name}" if name else "")


def create_ej(cluster: ControlPlane, ns: str, name: str = "demo-export", **source: Any) -> dict[str, Any]:
    spec = {"source": source or {"trainingJob": "demo"}, "resources": {"nodeSelector": NOWHERE}}
    document = {"apiVersion": "kiln.dev/v1alpha1", "kind": "ExportJob", "metadata": {"name": name}, "spec": spec}
    return cluster.kube.create(ej_path(ns), document)


def ej(cluster: ControlPlane, ns: str, name: str = "demo-export") -> dict[str, Any]:
    return cluster.kube.get(ej_path(ns, name))


def wait_ej(cluster: ControlPlane, ns: str, check: Any, what: str, name: str = "demo-export") -> dict[str, Any]:
    wait_until(lambda: check(ej(cluster, ns, name)), timeout=30, what=f"ExportJob {name}: {what}")
    return ej(cluster, ns, name)


def exporter_pod(cluster: ControlPlane, ns: str, name: str = "demo-export") -> dict[str, Any]:
    def listed() -> list[dict[str, Any]]:
        return cluster.kube.get(namespaced("pods", ns), labelSelector=f"kiln.dev/export-job={name}")["items"]

    wait_until(lambda: len(listed()) == 1, timeout=30, what="the exporter pod")
    return listed()[0]


def exporter_exits(cluster: ControlPlane, pod: dict[str, Any], exit_code: int, report: ExportReport) -> None:
    terminated = {"exitCode": exit_code, "reason": "Completed" if exit_code == 0 else "Error",
                  "message": report.to_json(), "startedAt": now(), "finishedAt": now()}  # fmt: skip
    status = {
        "phase": "Succeeded" if exit_code == 0 else "Failed",
        "conditions": [{"type": "Ready", "status": "False", "lastTransitionTime": now()}],
        "containerStatuses": [{"name": "exporter", "ready": False, "restartCount": 0, "image": "kiln/trainer:test",
                               "imageID": "", "state": {"terminated": terminated}}],
    }  # fmt: skip
    path = namespaced("pods", pod["metadata"]["namespace"], pod["metadata"]["name"]) + "/status"
    cluster.kube.patch(path, {"status": status}, content_type=MERGE)


def artifact(**fields: Any) -> Artifact:
    values = {"format": "onnx", "uri": "s3://runs/ml/demo/export/demo-export/model.onnx", "size_bytes": 4096,
              "sha256": "e" * 64, "verified": True, "max_abs_diff": 3e-6}  # fmt: skip
    return Artifact(**{**values, **fields})


def test_operator_rbac_allows_exactly_what_exportjobs_need(operator_kubeconfig: Path) -> None:
    """SelfSubjectAccessReviews as the operator's own ServiceAccount: the rules grant the ExportJob controller its
    verbs (and the end-to-end tests run under them), and nothing that would let it write specs or read Secrets."""
    client = KubeClient(operator_kubeconfig)

    def allowed(verb: str, resource: str, subresource: str = "", group: str = "kiln.dev") -> bool:
        attributes = {"namespace": "ml", "verb": verb, "group": group, "resource": resource, "subresource": subresource}
        review = {"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
                  "spec": {"resourceAttributes": attributes}}  # fmt: skip
        return bool(
            client.create("/apis/authorization.k8s.io/v1/selfsubjectaccessreviews", review)["status"]["allowed"]
        )

    try:
        for verb in ("get", "list", "watch", "patch"):
            assert allowed(verb, "exportjobs"), verb
        assert allowed("get", "exportjobs", "status") and allowed("patch", "exportjobs", "status")
        assert allowed("get", "trainingjobs") and allowed("watch", "trainingjobs")  # the source
        assert allowed("create", "jobs", group="batch") and allowed("list", "pods", group="")
        for verb, resource, subresource in [("create", "exportjobs", ""), ("update", "exportjobs", ""),
                                            ("delete", "exportjobs", ""), ("update", "exportjobs", "status"),
                                            ("create", "trainingjobs", "")]:  # fmt: skip
            assert not allowed(verb, resource, subresource), (verb, resource, subresource)
        assert not allowed("get", "secrets", group="")
    finally:
        client.close()


def test_export_waits_for_its_trainingjob_then_succeeds_with_the_reported_artifacts(
    cluster: ControlPlane, kiln_operator: OperatorProcess, namespace: str
) -> None:
    create_tj(cluster, namespace, resources={"nodeSelector": NOWHERE})
    create_ej(cluster, namespace)
    waiting = wait_ej(cluster, namespace, lambda e: condition(e, "WaitingForSource").get("status") == "True",
                      "WaitingForSource")  # fmt: skip
    assert (
        waiting["status"]["phase"] == "Pending"
        and "TrainingJob demo is" in condition(waiting, "WaitingForSource")["message"]
    )
    assert not cluster.kube.get(namespaced("jobs", namespace, group_version="batch/v1"),
                                labelSelector="kiln.dev/export-job")["items"]  # fmt: skip

    pods = attempt_pods(cluster, namespace, 1)
    set_terminated(cluster, pods[1], 0)
    set_terminated(cluster, pods[0], 0, json.dumps(FINAL))
    wait_phase(cluster, namespace, "Succeeded")

    started = wait_ej(cluster, namespace, lambda e: e.get("status", {}).get("sourceCheckpoint") == BEST, "resolved")
    assert condition(started, "WaitingForSource")["status"] == "False"
    job = cluster.kube.get(namespaced("jobs", namespace, "demo-export-export", group_version="batch/v1"))
    assert job["metadata"]["ownerReferences"][0]["uid"] == started["metadata"]["uid"]
    config = json.loads(
        cluster.kube.get(namespaced("configmaps", namespace, "demo-export-export"))["data"]["exportjob.json"]
    )
    assert config["spec"]["source"]["checkpointUri"] == BEST and config["sourceTrainingJob"] == "demo"

    report = ExportReport(state="completed", source_checkpoint=BEST, source_sha256="f" * 64, exported_weights="model",
                          verification_inputs="random", artifacts=[artifact()])  # fmt: skip
    exporter_exits(cluster, exporter_pod(cluster, namespace), 0, report)
    done = wait_ej(cluster, namespace, lambda e: e.get("status", {}).get("phase") == "Succeeded", "Succeeded")
    status = done["status"]
    assert condition(done, "Succeeded")["reason"] == "Exported" and status["completionTime"]
    assert status["artifacts"][0]["verified"] is True and status["sourceSha256"] == "f" * 64
    assert status["verified"] is True
    table = cluster.kubectl("get", "exportjob", "-n", namespace).stdout.split()
    assert table[:7] == ["NAME", "PHASE", "SOURCE", "CHECKPOINT", "FORMATS", "VERIFIED", "AGE"], table
    assert "Succeeded" in table and "demo" in table and "true" in table, table

    # Deleting the ExportJob takes its children with it (ownerReferences, the garbage collector).
    cluster.kube.delete(ej_path(namespace, "demo-export"))
    wait_until(lambda: not cluster.kube.exists(namespaced("jobs", namespace, "demo-export-export",
                                                          group_version="batch/v1")),
               timeout=30, what="the export Job garbage-collected")  # fmt: skip


def test_a_failed_verification_ends_the_job_at_once_with_its_reason(
    cluster: ControlPlane, kiln_operator: OperatorProcess, namespace: str
) -> None:
    # The real PodSecurity admission judges the exporter pod: a violation would leave the Job without one.
    labels = {
        "pod-security.kubernetes.io/enforce": "restricted",
        "pod-security.kubernetes.io/enforce-version": "latest",
    }
    cluster.kube.patch(f"/api/v1/namespaces/{namespace}", {"metadata": {"labels": labels}}, content_type=MERGE)
    create_ej(cluster, namespace, checkpointUri=BEST)  # an explicit URI: no TrainingJob to wait for
    reason = "onnx: max abs diff 0.03 > verify.tolerance 0.0001 over 8 random inputs"
    report = ExportReport.failure(
        reason,
        ExitCode.VERIFICATION_FAILED,
        Reason.VERIFICATION_FAILED,
        artifacts=[artifact(verified=False, max_abs_diff=0.03)],
    )
    exporter_exits(cluster, exporter_pod(cluster, namespace), 3, report)
    failed = wait_ej(cluster, namespace, lambda e: e.get("status", {}).get("phase") == "Failed", "Failed")
    assert condition(failed, "Failed")["reason"] == "VerificationFailed"
    assert condition(failed, "Failed")["message"] == f"{reason} (exit code 3)"
    assert failed["status"]["artifacts"][0]["maxAbsDiff"] == 0.03 and failed["status"]["verified"] is False
    # The Job's podFailurePolicy ended it on exit code 3: no second pod.
    job = cluster.kube.get(namespaced("jobs", namespace, "demo-export-export", group_version="batch/v1"))
    assert any(c["type"] == "Failed" and c["reason"] == "PodFailurePolicy" for c in job["status"]["conditions"]), job
    assert len(cluster.kube.get(namespaced("pods", namespace), labelSelector="kiln.dev/export-job")["items"]) == 1

    with pytest.raises(Exception, match="spec is immutable"):
        cluster.kube.patch(ej_path(namespace, "demo-export"), {"spec": {"formats": ["pt2"]}}, content_type=MERGE)
