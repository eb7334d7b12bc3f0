"""The operator with the real Kueue manager (kiln.testing.kueue), on the session control plane's kwok GPU nodes.

Each test gets its own ClusterQueue (quota in ``nvidia.com/gpu``) and LocalQueue. Jobs whose pods should run
to completion land on kwok, which plays them Running then Succeeded at once. A job that must hold its quota
while the test looks (the one in the queue's way, the one to be preempted) is pinned to a node that does not
exist: Kueue admits it all the same (admission is quota, not placement), and the test writes its pods' status
through the API, as a kubelet would, to run and finish it.

The first tests are pure: what the status says for each thing a Workload can say.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from operator_process import OperatorProcess
from tj_builders import body

from kiln.api.status import Condition, ConditionType, Phase, TrainingJobStatus
from kiln.api.training import RunPolicy
from kiln.operator import labels as L
from kiln.operator.kueue import KueueVerdict, workload_verdict
from kiln.operator.status import JobView, Observed, next_status
from kiln.testing import pod_status
from kiln.testing.controlplane import ControlPlane
from kiln.testing.kube import ApiError, namespaced
from kiln.testing.kueue import Kueue
from kiln.testing.processes import wait_until

NOWHERE = {"kiln.dev/nowhere": "true"}  # no node has it: the pods stay Pending until the test writes their status
HIGH_PRIORITY = "kiln-kueue-test-high"
PREEMPTED_MESSAGE = "Preempted to accommodate a workload (UID: 1, JobUID: 2) due to prioritization in the ClusterQueue"


# -- pure: the Workload's word reaches the status ----------------------------------------------------------------


def workload(*conditions: tuple[str, str, str, str]) -> dict[str, Any]:
    keys = ("type", "status", "reason", "message")
    return {"status": {"conditions": [dict(zip(keys, condition, strict=True)) for condition in conditions]}}


def test_an_evicted_workload_gives_kueues_reason_and_a_pending_one_its_message() -> None:
    evicted = workload(("QuotaReserved", "False", "Pending", "waiting"), ("Evicted", "True", "Preempted", "why"))
    assert workload_verdict(evicted) == KueueVerdict(evicted=True, reason="Preempted", message="why")
    pending = workload(("QuotaReserved", "False", "Pending", "insufficient unused quota for nvidia.com/gpu"))
    assert workload_verdict(pending) == KueueVerdict(False, "Pending", "insufficient unused quota for nvidia.com/gpu")
    readmitted = workload(("QuotaReserved", "True", "QuotaReserved", "ok"), ("Evicted", "False", "QuotaReserved", ""))
    assert workload_verdict(readmitted) is None
    assert workload_verdict(None) is None and workload_verdict({}) is None


def queued_decision(kueue: KueueVerdict | None) -> tuple[TrainingJobStatus, Any]:
    spec = body(runPolicy={"queueName": "team-a", "maxRestarts": 0})["spec"]
    was_running = Condition(type=ConditionType.RUNNING, status="True", reason="PodsRunning",
                            last_transition_time="2026-01-01T00:00:00Z")  # fmt: skip
    running = TrainingJobStatus(attempt=1, phase=Phase.RUNNING, conditions=[was_running])
    observed = Observed(
        generation=1,
        nodes=2,
        run_policy=RunPolicy.model_validate(spec["runPolicy"]),
        status=running,
        job=JobView(exists=True, suspended=True),
        kueue=kueue,
    )
    decision = next_status(observed, datetime(2026, 1, 1, tzinfo=UTC))
    return decision.status, decision


def test_an_eviction_is_queued_with_kueues_reason_never_a_failure_or_a_new_attempt() -> None:
    status, decision = queued_decision(KueueVerdict(evicted=True, reason="Preempted", message=PREEMPTED_MESSAGE))
    conditions = {c.type.value: c for c in status.conditions}
    assert status.phase == Phase.QUEUED and status.attempt == 1 and status.restarts == 0
    assert conditions["Queued"].status == "True" and conditions["Queued"].reason == "Preempted"
    assert PREEMPTED_MESSAGE in conditions["Queued"].message
    assert conditions["Running"].status == "False" and conditions["Running"].reason == "Preempted"
    assert "Failed" not in conditions and "Restarting" not in conditions
    assert decision.create_attempt is None and decision.delete_attempt is None, "the same Job waits to be readmitted"


def test_a_job_kueue_has_not_admitted_waits_with_kueues_message() -> None:
    status, _ = queued_decision(KueueVerdict(evicted=False, reason="Pending", message="insufficient quota"))
    queued = next(c for c in status.conditions if c.type.value == "Queued")
    assert (queued.reason, status.phase) == ("AwaitingAdmission", Phase.QUEUED)
    assert queued.message.endswith("; Kueue: insufficient quota")
    status, _ = queued_decision(None)  # no Workload yet (or no Kueue): the plain wait
    queued = next(c for c in status.conditions if c.type.value == "Queued")
    assert queued.message == "waiting for Kueue to admit the Job (queue team-a)"


# -- the real Kueue -------------------------------------------------------------------------------------------


class Tracker:
    """Reads TrainingJobs and remembers every phase each one was seen in."""

    def __init__(self, cluster: ControlPlane, namespace: str) -> None:
        self.cluster, self.namespace = cluster, namespace
        self.phases: dict[str, list[str]] = {}

    def get(self, name: str) -> dict[str, Any]:
        tj = self.cluster.kube.get(f"/apis/kiln.dev/v1alpha1/namespaces/{self.namespace}/trainingjobs/{name}")
        phase = (tj.get("status") or {}).get("phase", "")
        seen = self.phases.setdefault(name, [])
        if not seen or seen[-1] != phase:
            seen.append(phase)
        return tj

    def wait(self, name: str, phase: str, timeout: float = 30) -> dict[str, Any]:
        what = f"TrainingJob {self.namespace}/{name} phase {phase}"
        wait_until(lambda: self.get(name).get("status", {}).get("phase") == phase, timeout=timeout, what=what)
        return self.get(name)

    def never_failed(self, name: str) -> None:
        seen = self.phases.get(name, [])
        assert not {"Failed", "Restarting"} & set(seen), f"{name} went through {seen}"


def create_tj(
    cluster: ControlPlane, namespace: str, name: str, queue: str, *, nodes: int, gpus: int, hold: bool = False,
    **run_policy: Any,
) -> None:  # fmt: skip
    """A TrainingJob on ``queue``; ``hold``: its pods stay Pending (quota held) until the test finishes them."""
    document = body(name=name, namespace=namespace)
    for key in ("uid", "generation"):
        document["metadata"].pop(key)
    document["spec"]["resources"] = {"nodes": nodes, "gpusPerNode": gpus, **({"nodeSelector": NOWHERE} if hold else {})}
    document["spec"]["runPolicy"] = {"queueName": queue, "maxRestarts": 0, **run_policy}
    cluster.kube.create(f"/apis/kiln.dev/v1alpha1/namespaces/{namespace}/trainingjobs", document)


def condition(tj: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in tj.get("status", {}).get("conditions", []) if c["type"] == type_), {})


def attempt_job(cluster: ControlPlane, namespace: str, name: str) -> dict[str, Any]:
    path = namespaced("jobs", namespace, L.attempt_job_name(name, 1), group_version="batch/v1")
    wait_until(lambda: cluster.kube.exists(path), timeout=15, what=f"Job {namespace}/{name}-1")
    return cluster.kube.get(path)


def workload_of(kueue: Kueue, namespace: str, job: dict[str, Any]) -> dict[str, Any]:
    uid = job["metadata"]["uid"]
    found: list[dict[str, Any]] = []

    def made() -> bool:
        found[:] = [w for w in kueue.workloads(namespace) if w["metadata"]["labels"].get(L.KUEUE_JOB_UID) == uid]
        return bool(found)

    wait_until(made, timeout=15, what=f"Kueue's Workload for Job {job['metadata']['name']}")
    assert len(found) == 1, f"one Workload per Job, got {[w['metadata']['name'] for w in found]}"
    return found[0]


def workload_condition(workload: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in workload.get("status", {}).get("conditions", []) if c["type"] == type_), {})


def live_pods(cluster: ControlPlane, namespace: str, name: str) -> list[dict[str, Any]]:
    items = cluster.kube.get(namespaced("pods", namespace), labelSelector=f"{L.TRAINING_JOB}={name}")["items"]
    return [pod for pod in items if not pod["metadata"].get("deletionTimestamp")]


def write_pods(cluster: ControlPlane, namespace: str, name: str, count: int, *, finish: bool) -> None:
    """As a kubelet would: ``count`` pods of ``name`` Running (and Ready), or terminated with exit code 0."""
    wait_until(lambda: len(live_pods(cluster, namespace, name)) == count, timeout=15, what=f"{count} pods of {name}")
    now = pod_status.now()
    for pod in live_pods(cluster, namespace, name):
        if finish:
            result = pod_status.Terminated(0, "", now, now, "kiln://test")
            patch = pod_status.terminated(pod, result, restarts=0)
        else:
            patch = pod_status.running(pod, started_at=now, container_id="kiln://test", restarts=0, last=None)
        cluster.kube.patch(namespaced("pods", namespace, pod["metadata"]["name"]) + "/status", patch)


def job_suspended(cluster: ControlPlane, namespace: str, name: str) -> bool:
    return bool(attempt_job(cluster, namespace, name)["spec"].get("suspend"))


@pytest.mark.controlplane
@pytest.mark.timeout(90)
def test_a_queued_job_is_admitted_by_kueue_as_one_gang_and_succeeds(
    cluster: ControlPlane, kiln_operator: OperatorProcess, kueue: Kueue, namespace: str
) -> None:
    with kueue.queued(namespace, gpus=4) as queue:
        tracker = Tracker(cluster, namespace)
        create_tj(cluster, namespace, "demo", queue, nodes=2, gpus=1)
        tj = tracker.wait("demo", "Succeeded", timeout=60)
        assert condition(tj, "Queued")["status"] == "False" and condition(tj, "Queued")["reason"] == "JobCompleted"
        assert tj["status"]["attempt"] == 1 and tj["status"]["workers"]["succeeded"] == 2
        job = attempt_job(cluster, namespace, "demo")
        assert job["metadata"]["labels"][L.KUEUE_QUEUE_NAME] == queue
        workload = workload_of(kueue, namespace, job)
        # Both nodes are one Workload with one podSet of 2: Kueue admits the whole gang or none of it.
        assert [pod_set["count"] for pod_set in workload["spec"]["podSets"]] == [2]
        assert workload["status"]["admission"]["clusterQueue"] == queue
        assert workload_condition(workload, "Admitted")["status"] == "True"
        wait_until(lambda: workload_condition(workload_of(kueue, namespace, job), "Finished").get("status") == "True",
                   timeout=15, what="the Workload Finished")  # fmt: skip
        tracker.never_failed("demo")


@pytest.mark.controlplane
@pytest.mark.timeout(90)
def test_a_gang_that_does_not_fit_the_gpu_quota_stays_queued_then_runs(
    cluster: ControlPlane, kiln_operator: OperatorProcess, kueue: Kueue, namespace: str
) -> None:
    with kueue.queued(namespace, gpus=4) as queue:
        tracker = Tracker(cluster, namespace)
        create_tj(cluster, namespace, "first", queue, nodes=1, gpus=2, hold=True)  # holds 2 of the 4 GPUs
        wait_until(lambda: not job_suspended(cluster, namespace, "first"), timeout=30, what="first admitted")
        create_tj(cluster, namespace, "second", queue, nodes=2, gpus=2)  # needs 4; 2 are free: one pod would fit
        second_job = attempt_job(cluster, namespace, "second")
        pending = workload_of(kueue, namespace, second_job)
        wait_until(lambda: workload_condition(workload_of(kueue, namespace, second_job), "QuotaReserved")
                   .get("reason") == "Pending", timeout=15, what="Kueue's verdict on second")  # fmt: skip
        pending = workload_of(kueue, namespace, second_job)
        assert "insufficient unused quota" in workload_condition(pending, "QuotaReserved")["message"]
        assert [pod_set["count"] for pod_set in pending["spec"]["podSets"]] == [2]
        tj = tracker.wait("second", "Queued")
        assert condition(tj, "Queued")["reason"] == "AwaitingAdmission"
        assert job_suspended(cluster, namespace, "second") and live_pods(cluster, namespace, "second") == [], (
            "no pod of the gang starts while only half of it fits"
        )
        write_pods(cluster, namespace, "first", 1, finish=True)
        tracker.wait("first", "Succeeded")
        tj = tracker.wait("second", "Succeeded", timeout=60)  # admitted once first's quota is back; runs on kwok
        assert tj["status"]["attempt"] == 1 and condition(tj, "Queued")["status"] == "False"
        tracker.never_failed("first")
        tracker.never_failed("second")


@pytest.mark.controlplane
@pytest.mark.timeout(120)
def test_a_preempted_job_is_queued_with_kueues_reason_and_resumes_as_the_same_attempt(
    cluster: ControlPlane, kiln_operator: OperatorProcess, kueue: Kueue, namespace: str
) -> None:
    try:
        cluster.kube.create("/apis/scheduling.k8s.io/v1/priorityclasses", {
            "apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass", "metadata": {"name": HIGH_PRIORITY},
            "value": 1000, "description": "Kiln's Kueue tests: preempts the default priority",
        })  # fmt: skip
    except ApiError as error:
        if error.status != 409:
            raise
    with kueue.queued(namespace, gpus=4, preemption="LowerPriority") as queue:
        tracker = Tracker(cluster, namespace)
        create_tj(cluster, namespace, "low", queue, nodes=2, gpus=2, hold=True)  # all 4 GPUs
        wait_until(lambda: not job_suspended(cluster, namespace, "low"), timeout=30, what="low admitted")
        write_pods(cluster, namespace, "low", 2, finish=False)
        tracker.wait("low", "Running")
        low_job = attempt_job(cluster, namespace, "low")

        # The high-priority job holds its quota too, so the preempted one stays queued while the test looks.
        create_tj(cluster, namespace, "high", queue, nodes=1, gpus=2, hold=True, priorityClassName=HIGH_PRIORITY)
        tj = tracker.wait("low", "Queued")
        queued = condition(tj, "Queued")
        assert queued["status"] == "True" and queued["reason"] == "Preempted", queued
        assert "Preempted to accommodate a workload" in queued["message"], "Kueue's own message"
        assert condition(tj, "Running")["status"] == "False" and condition(tj, "Running")["reason"] == "Preempted"
        assert not condition(tj, "Failed") and tj["status"]["attempt"] == 1 and tj["status"]["restarts"] == 0
        evicted = workload_condition(workload_of(kueue, namespace, low_job), "Evicted")
        assert (evicted["status"], evicted["reason"]) == ("True", "Preempted")
        # The operator leaves the Job as Kueue set it: the same Job, still suspended, no new attempt.
        wait_until(lambda: not job_suspended(cluster, namespace, "high"), timeout=30, what="high admitted")
        assert job_suspended(cluster, namespace, "low")
        assert attempt_job(cluster, namespace, "low")["metadata"]["uid"] == low_job["metadata"]["uid"]
        assert live_pods(cluster, namespace, "low") == []

        write_pods(cluster, namespace, "high", 1, finish=True)
        tracker.wait("high", "Succeeded")
        # Readmitted: Kueue unsuspends the same Job, whose new pods resume from the checkpoint.
        wait_until(lambda: not job_suspended(cluster, namespace, "low"), timeout=30, what="low readmitted")
        write_pods(cluster, namespace, "low", 2, finish=True)
        tj = tracker.wait("low", "Succeeded")
        assert tj["status"]["attempt"] == 1 and tj["status"]["restarts"] == 0
        assert condition(tj, "Queued")["status"] == "False"
        assert "Queued" in tracker.phases["low"][tracker.phases["low"].index("Running") :]
        tracker.never_failed("low")
        tracker.never_failed("high")
