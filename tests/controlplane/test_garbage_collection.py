"""The garbage collector deletes children once their owner is gone."""

from __future__ import annotations

import pytest

from kiln.testing.controlplane import ControlPlane
from kiln.testing.kube import namespaced
from kiln.testing.processes import wait_until

pytestmark = pytest.mark.controlplane


def test_deleting_the_owner_collects_its_children(cluster: ControlPlane, namespace: str) -> None:
    configmaps = namespaced("configmaps", namespace)
    owner = cluster.kube.create(configmaps, {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "owner"}})
    reference = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner["metadata"]["uid"]}
    for index in range(2):
        cluster.kube.create(
            configmaps,
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": f"child-{index}", "ownerReferences": [reference]},
            },
        )

    cluster.kube.delete(f"{configmaps}/owner")

    wait_until(
        lambda: not any(cluster.kube.exists(f"{configmaps}/child-{index}") for index in range(2)),
        timeout=60,
        what="the garbage collector to delete both children",
    )
