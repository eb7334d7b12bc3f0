"""Train, then export, end to end: operator, control plane, local pod executor, real exporter, moto S3.

A one-node digits TrainingJob (test_end_to_end's manifest, one epoch) and an ExportJob pointing at it are applied
together. The ExportJob waits (WaitingForSource) while the TrainingJob trains; once it succeeds the operator pins
its best checkpoint and runs one exporter pod on the local executor node: ``python -m kiln.trainer.export``
exports ONNX, verifies it with onnxruntime against eager PyTorch, benchmarks it and writes the artifacts to S3.
Its ExportReport (the termination message) ends up in the ExportJob's status.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from operator_process import OperatorProcess
from test_end_to_end import create_secret, diagnostics, get_tj, manifest, s3_exists, upload_digits

from kiln.testing.controlplane import ControlPlane
from kiln.testing.kube import namespaced
from kiln.testing.nodes import executor_node_selector, pod_tolerations_for_executor
from kiln.testing.s3 import S3Server

pytestmark = [pytest.mark.controlplane, pytest.mark.slow, pytest.mark.timeout(420)]

EXPORT = "digits-export"


def export_manifest(namespace: str, s3: S3Server) -> dict[str, Any]:
    placement = {"nodeSelector": executor_node_selector(), "tolerations": pod_tolerations_for_executor()}
    return {
        "apiVersion": "kiln.dev/v1alpha1",
        "kind": "ExportJob",
        "metadata": {"name": EXPORT, "namespace": namespace},
        "spec": {
            "source": {"trainingJob": "digits", "checkpoint": "best"},
            "formats": ["onnx"],
            "benchmark": {"batchSizes": [1, 4], "iterations": 5},
            "resources": placement,
            "storage": {"endpointUrl": s3.endpoint_url, "region": "us-east-1", "secretRef": "s3-creds"},
        },
    }


def get_ej(cluster: ControlPlane, namespace: str) -> dict[str, Any]:
    return cluster.kube.get(f"/apis/kiln.dev/v1alpha1/namespaces/{namespace}/exportjobs/{EXPORT}")


def conditions(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in (obj.get("status") or {}).get("conditions") or []}


def test_an_exportjob_waits_for_training_then_exports_a_verified_onnx_model(
    cluster: ControlPlane,
    kiln_operator: OperatorProcess,
    namespace: str,
    s3_server: S3Server,
    s3_bucket: str,
    tmp_path: Path,
) -> None:
    upload_digits(s3_server, s3_bucket, tmp_path)
    create_secret(cluster, namespace, s3_server)
    training = manifest(namespace, s3_bucket, s3_server)
    training["spec"]["epochs"] = 1
    training["spec"]["resources"]["nodes"] = 1
    documents = [export_manifest(namespace, s3_server), training]  # the export first, as `kubectl apply -f dir/`
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(documents))

    waited, deadline = False, time.monotonic() + 400
    while time.monotonic() < deadline:
        export = get_ej(cluster, namespace)
        waited = waited or conditions(export).get("WaitingForSource", {}).get("status") == "True"
        if (export.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
            break
        time.sleep(0.5)
    status = export.get("status") or {}
    assert status.get("phase") == "Succeeded", diagnostics(cluster, namespace, kiln_operator) + json.dumps(status)
    assert waited, "the ExportJob never showed WaitingForSource while the TrainingJob trained"

    best = get_tj(cluster, namespace)["status"]["checkpoints"]["best"]
    assert status["sourceCheckpoint"] == best and len(status["sourceSha256"]) == 64, status
    assert conditions(export)["Succeeded"]["reason"] == "Exported", status
    assert status["verificationInputs"] in ("validation", "random") and status["exportedWeights"] in ("ema", "model")
    (onnx,) = [a for a in status["artifacts"] if a["format"] == "onnx" and a.get("quantization", "none") == "none"]
    assert onnx["verified"] is True and onnx["maxAbsDiff"] <= 1e-4 and status["verified"] is True, onnx
    assert onnx["uri"].startswith(f"s3://{s3_bucket}/runs/digits/output/export/{EXPORT}/"), onnx
    assert s3_exists(s3_server, onnx["uri"]), f"{onnx['uri']} is not in the bucket"
    assert set(onnx["latencyMs"]) == {"1", "4"}, onnx

    job = cluster.kube.get(namespaced("jobs", namespace, f"{EXPORT}-export", group_version="batch/v1"))
    assert job["status"].get("succeeded") == 1 and not job["status"].get("failed"), job["status"]
    table = cluster.kubectl("get", "exportjob", EXPORT, "-n", namespace).stdout
    assert "Succeeded" in table and "true" in table, table
