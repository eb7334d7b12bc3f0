"""Two operator replicas on the real control plane: only the Lease holder reconciles, and when it is SIGKILLed
mid-burst the standby takes over, with exactly one Job per TrainingJob attempt and none missing.

The replicas use the shipped lease timings (Settings' defaults). The takeover time is printed, not asserted:
the only deadline is the functional one, 15 s from the kill to the standby holding the Lease.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import pytest
from conftest import OPERATOR_NAMESPACE
from operator_process import OperatorProcess, shipped_lease_timings
from test_cluster import NOWHERE, create_tj, get_tj, jobs

from kiln.operator.labels import LEADER_LEASE
from kiln.operator.leader import micro_time
from kiln.operator.settings import Settings
from kiln.testing.controlplane import ControlPlane
from kiln.testing.kube import MERGE, namespaced
from kiln.testing.processes import wait_until

# Generous: the setup starts three operators (and the first test in a session the control plane) on a shared box.
pytestmark = [pytest.mark.controlplane, pytest.mark.timeout(300)]

BURST = 24
TAKEOVER_DEADLINE_S = 15.0
LEASE_PATH = namespaced("leases", OPERATOR_NAMESPACE, LEADER_LEASE, group_version="coordination.k8s.io/v1")


def lease_holder(cluster: ControlPlane) -> str:
    lease = cluster.kube.get(LEASE_PATH)
    return str(lease["spec"].get("holderIdentity") or "")


def reconciled_anything(replica: OperatorProcess) -> bool:
    return "kiln_operator_reconcile_total{" in replica.metrics()


@pytest.fixture
def replicas(
    cluster: ControlPlane, operator_kubeconfig: Path, kiln_operator: OperatorProcess
) -> Iterator[tuple[OperatorProcess, OperatorProcess]]:
    """Two replicas, "replica-a" the leader and "replica-b" standing by; the session's operator steps aside
    meanwhile (a clean stop releases the Lease, so replica-a acquires it at once)."""
    kiln_operator.stop()
    logs = cluster.root / "logs"
    timings = shipped_lease_timings()
    a = OperatorProcess(operator_kubeconfig, logs / "kiln-operator-replica-a.log", HOSTNAME="replica-a", **timings)
    b = OperatorProcess(operator_kubeconfig, logs / "kiln-operator-replica-b.log", HOSTNAME="replica-b", **timings)
    try:
        a.start()
        wait_until(lambda: lease_holder(cluster) == "replica-a", timeout=15, what="replica-a holding the Lease")
        b.start()  # Ready while standing by
        yield a, b
    finally:
        a.stop()
        b.stop()
        kiln_operator.start()


def test_killing_the_leader_mid_burst_hands_over_without_duplicates_or_losses(
    cluster: ControlPlane, replicas: tuple[OperatorProcess, OperatorProcess], namespace: str
) -> None:
    leader, standby = replicas
    names = [f"burst-{i:02d}" for i in range(BURST)]
    first, second = names[: BURST // 2], names[BURST // 2 :]

    def create(name: str) -> None:
        create_tj(cluster, namespace, name=name, resources={"nodeSelector": NOWHERE})

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(create, first))
        wait_until(lambda: len(jobs(cluster, namespace)) >= 2, timeout=15, what="the leader creating Jobs")
        assert not reconciled_anything(standby), "the standby reconciled while another replica held the Lease"
        leader.stop(kill=True)  # SIGKILL, mid-burst: no clean release of the Lease
        killed = time.monotonic()
        before = len(jobs(cluster, namespace))
        list(pool.map(create, second))  # the rest of the burst arrives with no leader at all

    wait_until(lambda: lease_holder(cluster) == "replica-b", timeout=TAKEOVER_DEADLINE_S, interval=0.05,
               what="replica-b taking the Lease over", on_tick=standby.check_alive)  # fmt: skip
    takeover = time.monotonic() - killed
    expected = [f"{name}-1" for name in names]
    wait_until(lambda: jobs(cluster, namespace) == expected, timeout=45, what=f"all {BURST} Jobs")
    settled = time.monotonic() - killed
    settings = Settings()
    print(
        f"\nleader SIGKILLed with {before}/{BURST} Jobs created; replica-b held the Lease {takeover:.1f} s later "
        f"(lease {settings.lease_duration_s:g} s, retry {settings.retry_period_s:g} s) and all {BURST} Jobs "
        f"existed {settled:.1f} s after the kill"
    )

    # Exactly one Job per TrainingJob attempt, and every TrainingJob at attempt 1 with its Created condition.
    def all_recorded() -> bool:
        return all((get_tj(cluster, namespace, name).get("status") or {}).get("attempt") == 1 for name in names)

    wait_until(all_recorded, timeout=30, what="status.attempt 1 on every TrainingJob")
    for _ in range(10):  # and it stays so: no late second attempt from anyone
        assert jobs(cluster, namespace) == expected
        time.sleep(0.2)


def test_a_leader_that_loses_its_lease_stops_at_once(
    cluster: ControlPlane, replicas: tuple[OperatorProcess, OperatorProcess]
) -> None:
    leader, _ = replicas
    assert leader.process is not None
    # Another holder, renewed just now: as if this leader had been partitioned away and replaced.
    stolen = {"spec": {"holderIdentity": "intruder", "renewTime": micro_time(datetime.now(UTC))}}
    cluster.kube.patch(LEASE_PATH, stolen, content_type=MERGE)
    try:
        wait_until(lambda: leader.process is not None and leader.process.poll() is not None,
                   timeout=3 * Settings().retry_period_s + 5, what="the leader to stop")  # fmt: skip
        assert leader.process.returncode == -signal.SIGKILL  # stopped by its lease process, mid-whatever
        assert "lost the leader Lease" in leader.log()
    finally:
        cluster.kube.delete(LEASE_PATH)  # so that the next operator need not wait for "intruder" to expire
