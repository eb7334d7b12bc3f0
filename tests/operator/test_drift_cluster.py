"""Drift repair on the real control plane: a deleted ConfigMap or Service comes back at once (same attempt), and
runPolicy.activeDeadlineSeconds, set or removed, reaches the running attempt's Job."""

from __future__ import annotations

from typing import Any

import pytest
from operator_process import OperatorProcess
from test_cluster import MERGE, NOWHERE, create_tj, events, get_tj, jobs, tj_path

from kiln.testing.controlplane import ControlPlane
from kiln.testing.kube import namespaced
from kiln.testing.processes import wait_until

pytestmark = [pytest.mark.controlplane, pytest.mark.timeout(90)]

# "At once": well before the 60 s resync, let alone a next attempt (there is none: the pods never start).
REPAIR_DEADLINE_S = 10


def uid(cluster: ControlPlane, path: str) -> str | None:
    return cluster.kube.get(path)["metadata"]["uid"] if cluster.kube.exists(path) else None


@pytest.mark.parametrize(("plural", "name"), [("configmaps", "demo-spec"), ("services", "demo-workers")])
def test_a_deleted_child_is_recreated_at_once_in_the_same_attempt(
    cluster: ControlPlane, kiln_operator: OperatorProcess, namespace: str, plural: str, name: str
) -> None:
    create_tj(cluster, namespace, resources={"nodeSelector": NOWHERE})
    wait_until(lambda: jobs(cluster, namespace) == ["demo-1"], timeout=15, what="Job created")
    path = namespaced(plural, namespace, name)
    wait_until(lambda: uid(cluster, path) is not None, timeout=15, what=f"{plural}/{name}")
    original = uid(cluster, path)
    cluster.kube.delete(path)
    wait_until(lambda: uid(cluster, path) not in (None, original), timeout=REPAIR_DEADLINE_S,
               what=f"{plural}/{name} recreated")  # fmt: skip
    # The same attempt: no second Job, and attempt 1 in the status (a new TrainingJob's first status may follow
    # its children until the creations pause, held.held_due).
    wait_until(lambda: (get_tj(cluster, namespace).get("status") or {}).get("attempt") == 1, timeout=10,
               what="status.attempt 1")  # fmt: skip
    assert jobs(cluster, namespace) == ["demo-1"]
    wait_until(lambda: ("Normal", "ChildRecreated") in events(cluster, namespace), timeout=10,
               what="a ChildRecreated Event")  # fmt: skip


def job_deadline(cluster: ControlPlane, namespace: str) -> Any:
    job = cluster.kube.get(namespaced("jobs", namespace, "demo-1", group_version="batch/v1"))
    return job["spec"].get("activeDeadlineSeconds")


def test_active_deadline_seconds_set_and_removed_reaches_the_running_job(
    cluster: ControlPlane, kiln_operator: OperatorProcess, namespace: str
) -> None:
    create_tj(cluster, namespace, resources={"nodeSelector": NOWHERE})
    wait_until(lambda: jobs(cluster, namespace) == ["demo-1"], timeout=15, what="Job created")
    assert job_deadline(cluster, namespace) is None

    cluster.kube.patch(tj_path(namespace, "demo"), {"spec": {"runPolicy": {"activeDeadlineSeconds": 3600}}},
                       content_type=MERGE)  # fmt: skip
    # The attempt has not started (its pods never schedule), so none of the deadline is spent yet.
    wait_until(lambda: job_deadline(cluster, namespace) == 3600, timeout=15, what="activeDeadlineSeconds set")

    cluster.kube.patch(tj_path(namespace, "demo"), {"spec": {"runPolicy": {"activeDeadlineSeconds": None}}},
                       content_type=MERGE)  # fmt: skip
    wait_until(lambda: job_deadline(cluster, namespace) is None, timeout=15, what="activeDeadlineSeconds removed")
    assert jobs(cluster, namespace) == ["demo-1"] and get_tj(cluster, namespace)["status"]["attempt"] == 1
