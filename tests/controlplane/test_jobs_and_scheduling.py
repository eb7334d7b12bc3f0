"""Jobs run to completion: on kwok's fake GPU nodes, and for real on the local executor."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from kiln.testing.controlplane import ControlPlane
from kiln.testing.kube import JSON, namespaced
from kiln.testing.nodes import GPU_RESOURCE, executor_node_selector, pod_tolerations_for_executor
from kiln.testing.processes import wait_until

pytestmark = pytest.mark.controlplane


def job(name: str, pod_spec: JSON, **spec: Any) -> JSON:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {"template": {"spec": {"restartPolicy": "Never", **pod_spec}}, **spec},
    }


def job_condition(cluster: ControlPlane, namespace: str, name: str) -> str | None:
    """``Complete`` or ``Failed`` once the Job finished, else None."""
    status = cluster.kube.get(namespaced("jobs", namespace, name, group_version="batch/v1")).get("status", {})
    for condition in status.get("conditions", []):
        if condition["type"] in ("Complete", "Failed") and condition["status"] == "True":
            return str(condition["type"])
    return None


def job_pods(cluster: ControlPlane, namespace: str, name: str) -> list[JSON]:
    return cluster.kube.get(namespaced("pods", namespace), labelSelector=f"job-name={name}")["items"]


def test_indexed_job_completes_on_fake_gpu_nodes(cluster: ControlPlane, namespace: str) -> None:
    gpu_container = {
        "name": "train",
        "image": "kiln/trainer:dev",
        "resources": {"limits": {GPU_RESOURCE: "8"}, "requests": {GPU_RESOURCE: "8"}},
    }
    manifest = job(
        "indexed",
        {"containers": [gpu_container]},
        completions=2,
        parallelism=2,
        completionMode="Indexed",
        backoffLimit=0,
    )

    cluster.kube.create(namespaced("jobs", namespace, group_version="batch/v1"), manifest)

    wait_until(
        lambda: job_condition(cluster, namespace, "indexed") == "Complete",
        timeout=60,
        what="the Indexed Job to complete",
    )
    pods = job_pods(cluster, namespace, "indexed")
    # Each pod asked for a whole node's 8 GPUs, so the scheduler spread them over both fake nodes.
    assert sorted(pod["spec"]["nodeName"] for pod in pods) == sorted(cluster.fake_gpu_node_names)
    assert sorted(pod["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] for pod in pods) == [
        "0",
        "1",
    ]


def test_job_on_the_executor_reports_the_real_exit_code(cluster: ControlPlane, namespace: str) -> None:
    container = {"name": "main", "image": "python:3.11", "command": ["python", "-c", "import sys; sys.exit(3)"]}
    manifest = job(
        "exits-3",
        {
            "containers": [container],
            "nodeSelector": executor_node_selector(),
            "tolerations": pod_tolerations_for_executor(),
        },
        backoffLimit=0,
    )

    cluster.kube.create(namespaced("jobs", namespace, group_version="batch/v1"), manifest)

    wait_until(lambda: job_condition(cluster, namespace, "exits-3") == "Failed", timeout=60, what="the Job to fail")
    [pod] = job_pods(cluster, namespace, "exits-3")
    assert pod["spec"]["nodeName"] == cluster.executor_node
    assert pod["status"]["phase"] == "Failed"
    assert pod["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 3


def test_executor_pod_succeeds_and_keeps_its_log(
    cluster: ControlPlane,
    namespace: str,
    executor_pod: Callable[..., JSON],
) -> None:
    pod = executor_pod("hello", ["python", "-c", "print('hello from', __import__('os').environ['HOSTNAME'])"])

    cluster.kube.create(namespaced("pods", namespace), pod)

    finished = cluster.wait_for_pod_phase(namespace, "hello")
    assert finished["status"]["phase"] == "Succeeded"
    assert finished["status"]["podIP"] == "127.0.0.1"
    assert cluster.pod_log(namespace, "hello") == "hello from hello\n"
