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
    # Not "one pod a node": kwok completes a Job's pod as soon as it runs, which frees its node's GPUs, so on a
    # loaded machine the second pod can be bound after the first finished, to the same node.
    assert {pod["spec"]["nodeName"] for pod in pods} <= set(cluster.fake_gpu_node_names)
    assert sorted(pod["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] for pod in pods) == [
        "0",
        "1",
    ]


def test_the_scheduler_counts_fake_gpus_whole_node_pods_spread_and_the_next_waits(
    cluster: ControlPlane, namespace: str
) -> None:
    def whole_node_pod(name: str) -> JSON:
        # No owner: kwok completes only pods a Job owns, so these keep their GPUs until the namespace goes.
        container = {"name": "train", "image": "kiln/trainer:dev", "resources": {"limits": {GPU_RESOURCE: "8"}}}
        return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": {"containers": [container]}}

    holders = [f"whole-node-{index}" for index in range(len(cluster.fake_gpu_node_names))]
    for name in holders:
        cluster.kube.create(namespaced("pods", namespace), whole_node_pod(name))

    def node_of(name: str) -> str | None:
        return cluster.kube.get(namespaced("pods", namespace, name))["spec"].get("nodeName")

    wait_until(lambda: all(node_of(name) for name in holders), timeout=60, what="every whole-node pod to be bound")
    assert sorted(node_of(name) or "" for name in holders) == sorted(cluster.fake_gpu_node_names)

    cluster.kube.create(namespaced("pods", namespace), whole_node_pod("one-too-many"))

    def unschedulable() -> str | None:
        pod = cluster.kube.get(namespaced("pods", namespace, "one-too-many"))
        for condition in pod.get("status", {}).get("conditions", []):
            if condition["type"] == "PodScheduled" and condition.get("reason") == "Unschedulable":
                return str(condition.get("message", ""))
        return None

    wait_until(lambda: unschedulable() is not None, timeout=60, what="the scheduler to find no node for a third pod")
    assert f"Insufficient {GPU_RESOURCE}" in (unschedulable() or "")
    assert node_of("one-too-many") is None


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
