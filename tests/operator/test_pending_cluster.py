"""A worker that cannot start, on the real control plane: the real scheduler finds no node for a pod whose staging
cache names a PersistentVolumeClaim that does not exist, and the TrainingJob says so (Running=False, the scheduler's
reason and message, a Warning Event, the kiln_trainingjob_blocked series) at the operator's next resync instead of
sitting in Pending without a word."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from operator_process import OperatorProcess
from prometheus_client.parser import text_string_to_metric_families
from test_cluster import condition, create_tj, events, get_tj, jobs

from kiln.testing.controlplane import ControlPlane
from kiln.testing.processes import wait_until

pytestmark = [pytest.mark.controlplane, pytest.mark.timeout(120)]

RESYNC_S = "2"
"""The resync that reads the pods, shortened from 60 s for this test only (the fuzz and drift tests rely on the
shipped interval being long)."""


@pytest.fixture
def quick_resync(kiln_operator: OperatorProcess) -> Iterator[OperatorProcess]:
    kiln_operator.stop()
    kiln_operator.settings["KILN_OPERATOR_RESYNC_INTERVAL_S"] = RESYNC_S
    try:
        yield kiln_operator.start()
    finally:
        kiln_operator.stop()
        kiln_operator.settings.pop("KILN_OPERATOR_RESYNC_INTERVAL_S")
        kiln_operator.start()


def test_a_missing_cache_claim_is_told_in_status(
    cluster: ControlPlane, quick_resync: OperatorProcess, namespace: str
) -> None:
    create_tj(cluster, namespace, data__staging={"cacheClaim": "team-cache"})
    wait_until(lambda: jobs(cluster, namespace) == ["demo-1"], timeout=30, what="Job created")

    def running_reason() -> str | None:
        return condition(get_tj(cluster, namespace), "Running").get("reason")

    wait_until(lambda: running_reason() == "Unschedulable", timeout=60, what="Running=False, Unschedulable",
               on_tick=quick_resync.check_alive)  # fmt: skip
    tj = get_tj(cluster, namespace)
    running = condition(tj, "Running")
    assert running["status"] == "False" and tj["status"]["phase"] == "Pending"
    assert running["message"].startswith("worker 0 (pod demo-1-0-"), running
    assert 'persistentvolumeclaim "team-cache" not found' in running["message"], running
    wait_until(lambda: ("Warning", "Unschedulable") in events(cluster, namespace), timeout=15,
               what="a Warning Event")  # fmt: skip
    assert events(cluster, namespace).count(("Warning", "Unschedulable")) == 1
    assert jobs(cluster, namespace) == ["demo-1"] and tj["status"]["attempt"] == 1  # waiting is no failure
    # What the KilnTrainingJobCannotStart alert reads, once the watch has delivered the status write.
    wanted = {"trainingjob_namespace": namespace, "trainingjob": "demo", "reason": "Unschedulable"}

    def blocked() -> list[float]:
        families = text_string_to_metric_families(quick_resync.metrics())
        return [
            s.value for f in families for s in f.samples if s.name == "kiln_trainingjob_blocked" and s.labels == wanted
        ]

    wait_until(lambda: blocked() == [1.0], timeout=15, what="the kiln_trainingjob_blocked series")
