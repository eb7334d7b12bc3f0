"""Node objects: fake GPU nodes that kwok keeps Ready, and the local executor's node.

Pods land on fake nodes by default (no taint): the scheduler treats them like real GPU
machines and kwok plays their kubelet. The executor node is tainted, so only pods that
tolerate ``EXECUTOR_TAINT_KEY`` and select ``EXECUTOR_NODE_LABEL`` really run, as local processes.
"""

from __future__ import annotations

from typing import Any

GPU_RESOURCE = "nvidia.com/gpu"
KWOK_ANNOTATION = "kwok.x-k8s.io/node"
KWOK_ANNOTATION_VALUE = "fake"
KWOK_NODE_SELECTOR = f"{KWOK_ANNOTATION}={KWOK_ANNOTATION_VALUE}"

EXECUTOR_NODE_NAME = "kiln-local-executor"
EXECUTOR_NODE_LABEL = "kiln.dev/local-executor"
EXECUTOR_TAINT_KEY = "kiln.dev/local-executor"

# Generous and fictional: the scheduler must fit a few 8-GPU training pods. Processes on the
# executor node share the host, whatever its real size.
FAKE_CAPACITY = {"cpu": "64", "memory": "512Gi", "pods": "110", GPU_RESOURCE: "8", "ephemeral-storage": "1Ti"}


def _node_info(kubelet_version: str) -> dict[str, str]:
    return {
        "architecture": "amd64",
        "operatingSystem": "linux",
        "kubeletVersion": kubelet_version,
        "kubeProxyVersion": "",
        "containerRuntimeVersion": "kiln://local",
        "osImage": "kiln",
        "kernelVersion": "",
        "machineID": "",
        "systemUUID": "",
        "bootID": "",
    }


def fake_gpu_node(name: str, kubelet_version: str) -> dict[str, Any]:
    """A node only kwok manages (it heartbeats it, then plays its pods' lifecycle)."""
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {KWOK_ANNOTATION: KWOK_ANNOTATION_VALUE, "node.alpha.kubernetes.io/ttl": "0"},
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "type": "kwok",
                "nvidia.com/gpu.present": "true",
            },
        },
        "status": {"allocatable": FAKE_CAPACITY, "capacity": FAKE_CAPACITY, "nodeInfo": _node_info(kubelet_version)},
    }


def executor_node(name: str, kubelet_version: str) -> dict[str, Any]:
    """The node the local executor registers, as a kubelet registers itself."""
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                EXECUTOR_NODE_LABEL: "true",
            },
        },
        "spec": {"taints": [{"key": EXECUTOR_TAINT_KEY, "value": "true", "effect": "NoSchedule"}]},
    }


def executor_node_status(
    kubelet_version: str, now: str, ready_since: str, kubelet_port: int | None = None
) -> dict[str, Any]:
    """The status a healthy kubelet reports; times are RFC 3339, ``now`` is the heartbeat. ``kubelet_port``: where
    the apiserver finds the container logs (``kiln.testing.kubelet_logs``)."""
    conditions = [
        ("Ready", "True", "KubeletReady", "kiln local executor is posting ready status"),
        ("MemoryPressure", "False", "KubeletHasSufficientMemory", ""),
        ("DiskPressure", "False", "KubeletHasNoDiskPressure", ""),
        ("PIDPressure", "False", "KubeletHasSufficientPID", ""),
    ]
    return {
        "capacity": FAKE_CAPACITY,
        "allocatable": FAKE_CAPACITY,
        "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": "localhost"}],
        "nodeInfo": _node_info(kubelet_version),
        **({"daemonEndpoints": {"kubeletEndpoint": {"Port": kubelet_port}}} if kubelet_port else {}),
        "conditions": [
            {
                "type": kind,
                "status": status,
                "reason": reason,
                "message": message,
                "lastHeartbeatTime": now,
                "lastTransitionTime": ready_since,
            }
            for kind, status, reason, message in conditions
        ],
    }


def pod_tolerations_for_executor() -> list[dict[str, str]]:
    """What a pod spec needs (with ``executor_node_selector()``) to run on the executor node."""
    return [{"key": EXECUTOR_TAINT_KEY, "operator": "Exists", "effect": "NoSchedule"}]


def executor_node_selector() -> dict[str, str]:
    return {EXECUTOR_NODE_LABEL: "true"}
