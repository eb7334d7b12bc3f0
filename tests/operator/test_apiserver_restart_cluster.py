"""The kube-apiserver restarted mid-run (issue 13 §2): the operator recovers without a restart of its own.

The digits job of ``test_faults_cluster`` trains on the local executor (real torchrun, checkpoints to moto S3).
Once its status shows a checkpoint, the apiserver is stopped for ``OUTAGE_S`` and started again on the same
port, etcd and certificates (``ControlPlane.apiserver_stopped``). Nothing the pods do needs the apiserver, so
the run goes on; the operator loses its watches, its status writes and its Lease renewals meanwhile. Then:

- the same operator process (same PID, never exited) goes on reconciling: the status shows epochs trained
  after the outage, a ``kiln.dev/stop`` set afterwards ends the run Succeeded (Stopped), and a kwok TrainingJob
  created afterwards (seen only through a re-established watch) succeeds on its one Job;
- no work is lost: there was no restart at all, the first attempt's metrics hold every epoch exactly once;
- no duplicate children and a truthful status at every poll: never Restarting or Failed, one Job, two pods.

The operator runs with the shipped lease timings (renew deadline 8 s), and the outage is longer than that: its
lease process pauses it (SIGSTOP) at the deadline and resumes it (SIGCONT) once it renewed the unchanged Lease
after the restart, as its log says (docs/operations.md, "Leader election").
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fleet_witness import FleetWitness
from operator_process import OperatorProcess, shipped_lease_timings
from test_cluster import create_tj
from test_faults_cluster import NODES, Witness, checkpointed_mid_run, metrics_records, start_long_job

from kiln.api.contract import Annotation
from kiln.testing.controlplane import ControlPlane
from kiln.testing.kube import MERGE
from kiln.testing.s3 import S3Server
from kiln.trainer.history import RESTARTED_AT

pytestmark = [pytest.mark.controlplane, pytest.mark.slow, pytest.mark.timeout(600)]

OUTAGE_S = 15.0
"""Longer than the shipped renew deadline (8 s): the operator is paused meanwhile."""
PAUSED, RESUMED = "pausing the operator until a renewal succeeds", "resumed the operator after"


@pytest.fixture
def shipped_operator(cluster: ControlPlane, operator_kubeconfig: Path, kiln_operator: OperatorProcess) -> Iterator[
    OperatorProcess
]:  # fmt: skip
    """An operator with the shipped lease timings; the session's one steps aside meanwhile (a clean stop releases
    the Lease, so this one acquires it at once)."""
    operator = OperatorProcess(operator_kubeconfig, cluster.root / "logs" / "kiln-operator-shipped-lease.log",
                               **shipped_lease_timings())  # fmt: skip
    with kiln_operator.stepped_aside():
        try:
            yield operator.start()
        finally:
            operator.stop()


def test_the_operator_rides_out_an_apiserver_restart(
    cluster: ControlPlane,
    shipped_operator: OperatorProcess,
    namespace: str,
    s3_server: S3Server,
    s3_bucket: str,
    tmp_path: Path,
) -> None:
    kiln_operator, name, started = shipped_operator, "apiserver-restart", time.monotonic()
    # Far longer than the test: a stop ends it once the epochs after the outage are seen (machine-independent).
    start_long_job(cluster, namespace, s3_server, s3_bucket, tmp_path, name, epochs=200)
    witness = Witness(cluster, kiln_operator, namespace, name)
    # Long: torchrun's start and the first epoch took 190 s at load average 18 on the 2-core machine.
    witness.until(checkpointed_mid_run, timeout=300, what="attempt 1 running with a checkpoint")
    assert kiln_operator.process is not None
    operator_pid = kiln_operator.process.pid

    stopped = time.monotonic()
    with cluster.apiserver_stopped():
        time.sleep(OUTAGE_S)
        kiln_operator.check_alive()
    back, before_outage = time.monotonic(), witness.epochs[1]

    # A TrainingJob the operator can only learn of through a watch opened after the restart.
    late = FleetWitness(cluster, namespace, ["after-restart"], nodes=2)
    create_tj(cluster, namespace, name="after-restart")
    late.until_all_succeeded(timeout=120, on_tick=kiln_operator.check_alive)
    late.assert_one_job_each_told_truthfully()
    handled = time.monotonic()

    # Training went on meanwhile; a larger epoch in the status is a status write after the restart.
    witness.until(lambda s: int((s.get("progress") or {}).get("epoch") or 0) > before_outage, timeout=120,
                  what="epochs trained after the outage in the status")  # fmt: skip
    annotate = {"metadata": {"annotations": {Annotation.STOP: "true"}}}
    cluster.kube.patch(f"/apis/kiln.dev/v1alpha1/namespaces/{namespace}/trainingjobs/{name}", annotate,
                       content_type=MERGE)  # fmt: skip
    status = witness.until(lambda s: s.get("phase") == "Succeeded", timeout=90, what="success after the stop")
    print(f"\ncheckpointed {stopped - started:.0f} s in; apiserver down {OUTAGE_S:g} s, ready {back - stopped:.0f} s "
          f"after its stop; a new TrainingJob Succeeded {handled - back:.0f} s later; Stopped at epoch "
          f"{status['progress']['epoch']} {time.monotonic() - handled:.0f} s after that")  # fmt: skip

    assert kiln_operator.process is not None and kiln_operator.process.pid == operator_pid, "the operator restarted"
    kiln_operator.check_alive()
    # Paused at the renew deadline and resumed after the outage (a renewal starved by load may add a pair).
    log = kiln_operator.log()
    assert log.count(PAUSED) >= 1 and log.count(PAUSED) == log.count(RESUMED), log[-3000:]
    assert log.index(PAUSED) < log.index(RESUMED) and "lost the leader Lease" not in log, log[-3000:]
    print("\n".join(line for line in log.splitlines() if PAUSED in line or RESUMED in line))
    assert not witness.untruths, witness.untruths
    assert witness.phases in (["Pending", "Running", "Succeeded"], ["Running", "Succeeded"]), witness.phases
    assert witness.jobs.keys() == {f"{name}-1"} and len(witness.jobs[f"{name}-1"]) == 1, witness.jobs
    assert {attempt: len(uids) for attempt, uids in witness.pods.items()} == {"1": NODES}, witness.pods
    assert status["attempt"] == 1 and status["restarts"] == 0 and not witness.restarting, status
    succeeded = next(c for c in status["conditions"] if c["type"] == "Succeeded")
    assert succeeded["reason"] == "Stopped", succeeded
    records = metrics_records(s3_server, s3_bucket, name)
    assert not [r for r in records if RESTARTED_AT in r], records
    assert sorted(r["epoch"] for r in records) == list(range(1, int(status["progress"]["epoch"]) + 1)), records
