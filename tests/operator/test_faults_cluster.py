"""Fault injection on the real path: operator, control plane, local executor, real torchrun, moto S3.

Each test trains the digits job of ``test_end_to_end`` for several epochs, checkpointing every epoch, injects
one fault once the status shows a checkpoint, and checks three things:

- no work is lost beyond one checkpoint interval: the restarted process's first ``metrics.jsonl`` record says
  where it resumed (``restartedAt``), which is at most one epoch behind the last epoch the status showed;
- no duplicate children: one Job per attempt, and exactly ``nodes`` pods per attempt (Kubernetes never
  replaces a single rank: ``backoffLimit: 0`` and the podFailurePolicy);
- the status tells the truth at every poll: never Failed, ``restarts == attempt - 1``, and the phases run
  Running, Restarting, Running, Succeeded, with the Restarting condition naming the cause.

The faults are what Kubernetes does, not simulations of it: an eviction through the Eviction API (which adds
the pod's ``DisruptionTarget`` condition before the graceful delete), and the deletion of the Node object the
worker pods are bound to (the pod garbage collector marks them Failed with ``DisruptionTarget`` and deletes
them; this takes its fixed 40 s quarantine, plus up to one 20 s sweep).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from operator_process import OperatorProcess
from test_end_to_end import create_secret, diagnostics, get_tj, manifest, upload_digits

from kiln.api.contract import Annotation
from kiln.operator import labels as L
from kiln.testing.controlplane import ControlPlane
from kiln.testing.kube import MERGE, ApiError, namespaced
from kiln.testing.nodes import executor_node
from kiln.testing.processes import wait_until
from kiln.testing.s3 import S3Server
from kiln.trainer.history import METRICS, RESTARTED_AT

pytestmark = [pytest.mark.controlplane, pytest.mark.slow, pytest.mark.timeout(300)]

NODES = 2
POLL_SECONDS = 0.2
Status = dict[str, Any]


@dataclass
class Witness:
    """What the TrainingJob's status, its Jobs and its pods showed at every poll of one test."""

    cluster: ControlPlane
    operator: OperatorProcess
    namespace: str
    name: str
    phases: list[str] = field(default_factory=list)
    """The phases in the order seen, repeats collapsed."""
    jobs: dict[str, set[str]] = field(default_factory=dict)
    """Job name -> every uid seen under it (a second uid is a duplicate child)."""
    pods: dict[str, set[str]] = field(default_factory=dict)
    """Attempt label -> the uids of every worker pod seen for it."""
    epochs: dict[int, int] = field(default_factory=dict)
    """Attempt -> the largest ``progress.epoch`` the status showed while it was the current attempt."""
    restarting: list[str] = field(default_factory=list)
    """Every message of a Restarting=True condition."""
    untruths: list[str] = field(default_factory=list)

    def poll(self) -> Status:
        status: Status = get_tj(self.cluster, self.namespace, self.name).get("status") or {}
        phase = status.get("phase")
        attempt, restarts = int(status.get("attempt") or 0), int(status.get("restarts") or 0)
        if phase and (not self.phases or self.phases[-1] != phase):
            self.phases.append(phase)
        if phase == "Failed":
            self.untruths.append(f"phase Failed: {status.get('conditions')}")
        if attempt and restarts != attempt - 1:  # nothing here suspends, so every attempt after the first is a restart
            self.untruths.append(f"attempt {attempt} with {restarts} restarts")
        if attempt:
            epoch = int((status.get("progress") or {}).get("epoch") or 0)
            self.epochs[attempt] = max(self.epochs.get(attempt, 0), epoch)
        for condition in status.get("conditions") or []:
            restarting = condition["type"] == "Restarting" and condition["status"] == "True"
            if restarting and condition["message"] not in self.restarting:
                self.restarting.append(condition["message"])
        own = f"{L.TRAINING_JOB}={self.name}"  # not another TrainingJob's in the namespace
        for job in self.cluster.kube.get(namespaced("jobs", self.namespace, group_version="batch/v1"),
                                         labelSelector=own)["items"]:  # fmt: skip
            self.jobs.setdefault(job["metadata"]["name"], set()).add(job["metadata"]["uid"])
        for pod in self.cluster.kube.get(namespaced("pods", self.namespace), labelSelector=own)["items"]:
            attempt_label = (pod["metadata"].get("labels") or {}).get(L.ATTEMPT)
            if attempt_label is not None:
                self.pods.setdefault(attempt_label, set()).add(pod["metadata"]["uid"])
        return status

    def until(self, done: Callable[[Status], bool], timeout: float, what: str) -> Status:
        """Poll until ``done(status)``; a finished job that is not done, or the timeout, fails the test."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.poll()
            if done(status):
                return status
            finished = status.get("phase") in ("Succeeded", "Failed")
            if finished or time.monotonic() > deadline:
                why = f"finished as {status.get('phase')}" if finished else f"not within {timeout:.0f}s"
                raise AssertionError(f"{what}: {why}\n" + self.diagnostics())
            time.sleep(POLL_SECONDS)

    def diagnostics(self) -> str:
        return diagnostics(self.cluster, self.namespace, self.operator, self.name)

    def assert_one_restart_told_truthfully(self) -> None:
        assert not self.untruths, self.untruths
        assert self.phases in (
            ["Pending", "Running", "Restarting", "Running", "Succeeded"],
            ["Running", "Restarting", "Running", "Succeeded"],
        ), self.phases
        assert self.jobs.keys() == {f"{self.name}-1", f"{self.name}-2"}, self.jobs
        assert all(len(uids) == 1 for uids in self.jobs.values()), f"a Job was created twice: {self.jobs}"
        assert {attempt: len(uids) for attempt, uids in self.pods.items()} == {"1": NODES, "2": NODES}, self.pods


def start_long_job(
    cluster: ControlPlane, namespace: str, s3: S3Server, bucket: str, tmp_path: Path, name: str, epochs: int
) -> None:
    upload_digits(s3, bucket, tmp_path)
    create_secret(cluster, namespace, s3)
    document = manifest(namespace, bucket, s3, name=name)
    document["spec"]["epochs"] = epochs
    # Room for a second, wrong restart, so that the test sees it (restarts == 1) instead of a Failed job.
    document["spec"]["runPolicy"] = {"maxRestarts": 2, "terminationGracePeriodSeconds": 10}
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(document))


def checkpointed_mid_run(status: Status) -> bool:
    """Attempt 1 runs and has saved at least one epoch's checkpoint: the moment to inject a fault."""
    epoch = int((status.get("progress") or {}).get("epoch") or 0)
    latest = (status.get("checkpoints") or {}).get("latest")
    return status.get("phase") == "Running" and status.get("attempt") == 1 and epoch >= 1 and bool(latest)


def attempt_pods(cluster: ControlPlane, namespace: str, attempt: int) -> list[dict[str, Any]]:
    pods = cluster.kube.get(namespaced("pods", namespace), labelSelector=f"{L.ATTEMPT}={attempt}")["items"]
    return sorted(pods, key=lambda pod: int(pod["metadata"]["annotations"][L.COMPLETION_INDEX_ANNOTATION]))


def metrics_records(s3: S3Server, bucket: str, name: str) -> list[dict[str, Any]]:
    body = s3.client().get_object(Bucket=bucket, Key=f"runs/{name}/output/{METRICS}")["Body"].read()
    return [json.loads(line) for line in body.decode().splitlines() if line.strip()]


def assert_resumed_from_a_checkpoint(records: list[dict[str, Any]], epoch_before_fault: int, last_epoch: int) -> None:
    """One restart, which resumed at most one checkpoint interval (an epoch) behind where attempt 1 had got to,
    and every epoch recorded exactly once."""
    resumed = [record[RESTARTED_AT] for record in records if RESTARTED_AT in record]
    assert len(resumed) == 1, records
    assert resumed[0] >= max(1, epoch_before_fault - 1), (resumed, epoch_before_fault, records)
    assert sorted(record["epoch"] for record in records) == list(range(1, last_epoch + 1)), records


def test_an_evicted_worker_pod_restarts_the_gang_from_its_checkpoint(
    cluster: ControlPlane,
    kiln_operator: OperatorProcess,
    namespace: str,
    s3_server: S3Server,
    s3_bucket: str,
    tmp_path: Path,
) -> None:
    """Evicting one rank (as a drain or the descheduler would) restarts the whole gang once, from the checkpoint."""
    name, epochs = "evicted", 6
    start_long_job(cluster, namespace, s3_server, s3_bucket, tmp_path, name, epochs)
    witness = Witness(cluster, kiln_operator, namespace, name)
    witness.until(checkpointed_mid_run, timeout=150, what="attempt 1 running with a checkpoint")

    victim = attempt_pods(cluster, namespace, 1)[1]["metadata"]["name"]
    eviction = {"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": victim, "namespace": namespace}}
    cluster.kube.create(namespaced("pods", namespace, victim) + "/eviction", eviction)

    status = witness.until(lambda s: s.get("phase") == "Succeeded", timeout=200, what="success after the eviction")
    witness.assert_one_restart_told_truthfully()
    assert status["attempt"] == 2 and status["restarts"] == 1, status
    assert status["workers"]["succeeded"] == NODES, status
    assert status["progress"]["epoch"] == epochs, status["progress"]
    assert len(witness.restarting) == 1 and witness.restarting[0].startswith("restart 1/2 as attempt 2: "), witness
    assert victim in witness.restarting[0], witness.restarting  # the cause is the evicted pod, not its peer
    records = metrics_records(s3_server, s3_bucket, name)
    assert_resumed_from_a_checkpoint(records, witness.epochs[1], epochs)


def test_a_lost_node_restarts_the_gang_once_a_node_is_back(
    cluster: ControlPlane,
    kiln_operator: OperatorProcess,
    namespace: str,
    s3_server: S3Server,
    s3_bucket: str,
    tmp_path: Path,
) -> None:
    """The Node object the workers are bound to is deleted; its kubelet (the executor) keeps the processes
    running, as a partitioned kubelet would, until the pod garbage collector marks them Failed and deletes
    them. The new attempt waits, Restarting, until a node is back, then resumes from the checkpoint.

    The pods run on the executor's node (the kwok nodes only play pods, they run nothing), so that is the node
    lost. The job is far longer than the test: once attempt 2 has trained an epoch, ``kiln.dev/stop`` ends it
    (a checkpoint, then success), because how many epochs attempt 1 trains while the node is partitioned depends
    on the machine's load."""
    name = "node-lost"
    start_long_job(cluster, namespace, s3_server, s3_bucket, tmp_path, name, epochs=200)
    witness = Witness(cluster, kiln_operator, namespace, name)
    witness.until(checkpointed_mid_run, timeout=150, what="attempt 1 running with a checkpoint")
    bound_to = {pod["spec"].get("nodeName") for pod in attempt_pods(cluster, namespace, 1)}
    assert bound_to == {cluster.executor_node}, bound_to

    node_path = f"/api/v1/nodes/{cluster.executor_node}"
    cluster.kube.delete(node_path)
    try:
        status = witness.until(lambda s: s.get("attempt") == 2, timeout=120, what="a restart after the node loss")
        assert witness.epochs[1] >= 1, witness.epochs
        # No node can take attempt 2: its pods wait unscheduled, and the status says Restarting, not Running.
        witness.until(lambda s: len(attempt_pods(cluster, namespace, 2)) == NODES, timeout=30, what="attempt 2 pods")
        for pod in attempt_pods(cluster, namespace, 2):
            assert not pod["spec"].get("nodeName") and pod["status"]["phase"] == "Pending", pod
        status = witness.poll()
        assert status["phase"] == "Restarting" and status["restarts"] == 1, status
    finally:
        restore_executor_node(cluster)

    witness.until(lambda s: s.get("attempt") == 2 and s.get("phase") == "Running", timeout=90, what="attempt 2 runs")
    resumed_from = witness.epochs[2]
    witness.until(lambda s: int((s.get("progress") or {}).get("epoch") or 0) > resumed_from, timeout=90,
                  what="attempt 2 trains an epoch")  # fmt: skip
    annotate = {"metadata": {"annotations": {Annotation.STOP: "true"}}}
    cluster.kube.patch(f"/apis/kiln.dev/v1alpha1/namespaces/{namespace}/trainingjobs/{name}", annotate,
                       content_type=MERGE)  # fmt: skip
    status = witness.until(lambda s: s.get("phase") == "Succeeded", timeout=90, what="success after the stop")

    witness.assert_one_restart_told_truthfully()
    assert status["attempt"] == 2 and status["restarts"] == 1, status
    succeeded = next(c for c in status["conditions"] if c["type"] == "Succeeded")
    assert succeeded["reason"] == "Stopped", succeeded
    assert len(witness.restarting) == 1 and witness.restarting[0].startswith("restart 1/2 as attempt 2: "), witness
    records = metrics_records(s3_server, s3_bucket, name)
    assert_resumed_from_a_checkpoint(records, witness.epochs[1], int(status["progress"]["epoch"]))


def restore_executor_node(cluster: ControlPlane) -> None:
    """Bring the executor's Node back, as a replacement machine's kubelet registering would, so that this and
    later tests have somewhere to run. The executor (like a kubelet) registers only at start-up; its next
    heartbeat then makes the re-created object Ready."""
    try:
        cluster.kube.create("/api/v1/nodes", executor_node(cluster.executor_node, cluster.kubernetes_version))
    except ApiError as error:
        if error.status != 409:
            raise

    def ready() -> bool:
        conditions = cluster.kube.get(f"/api/v1/nodes/{cluster.executor_node}").get("status", {}).get("conditions")
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions or [])

    wait_until(ready, timeout=60, what=f"node {cluster.executor_node} Ready again")
