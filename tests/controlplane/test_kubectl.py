"""The real kubectl talks to the real apiserver: nodes, apply, get, delete."""

from __future__ import annotations

import json

import pytest

from kiln.testing.controlplane import ControlPlane, KubectlError
from kiln.testing.nodes import GPU_RESOURCE

pytestmark = pytest.mark.controlplane


def test_nodes_are_fake_gpu_nodes_plus_the_executor(cluster: ControlPlane) -> None:
    nodes = json.loads(cluster.kubectl("get", "nodes", "-o", "json").stdout)["items"]

    by_name = {node["metadata"]["name"]: node for node in nodes}
    assert set(by_name) == {*cluster.fake_gpu_node_names, cluster.executor_node}
    for name in cluster.fake_gpu_node_names:
        assert by_name[name]["status"]["allocatable"][GPU_RESOURCE] == "8"
    for node in nodes:
        ready = {c["type"]: c["status"] for c in node["status"]["conditions"]}["Ready"]
        assert ready == "True", node["metadata"]["name"]


def test_apply_get_delete(cluster: ControlPlane, namespace: str) -> None:
    manifest = json.dumps(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "settings", "namespace": namespace},
            "data": {"lr": "0.1"},
        }
    )

    applied = cluster.kubectl("apply", "-f", "-", input=manifest)
    fetched = cluster.kubectl("get", "configmap", "settings", "-n", namespace, "-o", "jsonpath={.data.lr}")
    deleted = cluster.kubectl("delete", "configmap", "settings", "-n", namespace)
    missing = cluster.kubectl("get", "configmap", "settings", "-n", namespace, check=False)

    assert "configmap/settings created" in applied.stdout
    assert fetched.stdout == "0.1"
    assert "deleted" in deleted.stdout
    assert missing.returncode != 0 and "NotFound" in missing.stderr


def test_components_report_the_release_they_were_built_from(cluster: ControlPlane) -> None:
    version = json.loads(cluster.kubectl("version", "-o", "json").stdout)["serverVersion"]

    assert version["gitVersion"] == cluster.kubernetes_version
    assert not version["gitVersion"].startswith("v0.0.0")


def test_a_failed_kubectl_says_what_kubectl_said(cluster: ControlPlane, namespace: str) -> None:
    with pytest.raises(KubectlError, match=r'exit status 1\. Error from server \(NotFound\): configmaps "absent"'):
        cluster.kubectl("get", "configmap", "absent", "-n", namespace)
