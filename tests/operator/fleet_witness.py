"""Many kwok TrainingJobs of one namespace watched at once, for the fault tests of the operator and its apiserver.

Every poll lists the TrainingJobs first, then the Jobs and pods: whatever a status claims, the children listed
after it must already show (a status is written only after the Job it describes exists). Over all polls the
witness records

- duplicate children: a Job name seen with a second uid (deleted and created again), a Job that is not its
  TrainingJob's ``<name>-<attempt>``, two Jobs of one TrainingJob at once, more pods than ``nodes`` for one;
- untruths: a phase outside Pending -> Running -> Succeeded or moving backwards, an attempt other than 1 or
  a restart (nothing here fails), ``attempt``/``Created`` without the Job, Succeeded before the Job completed.

The jobs are kwok's: pods on the fake GPU nodes run about a second and succeed, so there is no training to
lose; a Job created twice is how work would be lost (its pods started over).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kiln.api.status import ConditionType as C
from kiln.api.status import Phase
from kiln.operator import labels as L
from kiln.testing.controlplane import ControlPlane
from kiln.testing.kube import namespaced

Obj = dict[str, Any]
ORDER = [Phase.PENDING.value, Phase.RUNNING.value, Phase.SUCCEEDED.value]
POLL_SECONDS = 0.3


def true_conditions(obj: Obj) -> set[str]:
    return {c["type"] for c in (obj.get("status") or {}).get("conditions") or [] if c.get("status") == "True"}


@dataclass
class FleetWitness:
    cluster: ControlPlane
    namespace: str
    names: list[str]
    """The TrainingJobs watched; the namespace's others (and their children) are not this witness's business."""
    nodes: int
    """Pods per attempt of every TrainingJob watched."""
    phases: dict[str, list[str]] = field(default_factory=dict)
    """TrainingJob -> the phases in the order seen, repeats collapsed."""
    job_uids: dict[str, set[str]] = field(default_factory=dict)
    """Job name -> every uid seen under it."""
    pod_uids: dict[str, set[str]] = field(default_factory=dict)
    """TrainingJob -> the uid of every worker pod seen for it."""
    duplicates: list[str] = field(default_factory=list)
    untruths: list[str] = field(default_factory=list)
    polls: int = 0

    def poll(self) -> dict[str, Obj]:
        """One look at everything; returns the TrainingJobs by name."""
        kube = self.cluster.kube
        listed = kube.get(f"/apis/{L.TJ_GROUP}/{L.TJ_VERSION}/namespaces/{self.namespace}/{L.TJ_PLURAL}")["items"]
        tjs = {tj["metadata"]["name"]: tj for tj in listed if tj["metadata"]["name"] in self.names}
        jobs = [job for job in kube.get(namespaced("jobs", self.namespace, group_version="batch/v1"))["items"]
                if job["metadata"].get("labels", {}).get(L.TRAINING_JOB) in self.names]  # fmt: skip
        pods = [pod for pod in kube.get(namespaced("pods", self.namespace), labelSelector=L.TRAINING_JOB)["items"]
                if pod["metadata"]["labels"][L.TRAINING_JOB] in self.names]  # fmt: skip
        self.polls += 1
        jobs_by_owner: dict[str, list[Obj]] = {}
        for job in jobs:
            meta = job["metadata"]
            owner, attempt = meta["labels"].get(L.TRAINING_JOB, ""), meta["labels"].get(L.ATTEMPT, "")
            jobs_by_owner.setdefault(owner, []).append(job)
            uids = self.job_uids.setdefault(meta["name"], set())
            uids.add(meta["uid"])
            if len(uids) == 2:  # noted once, when first seen
                self._note(self.duplicates, f"Job {meta['name']} created again: uids {sorted(uids)}")
            if meta["name"] != L.attempt_job_name(owner, int(attempt or 0)):
                self._note(self.duplicates, f"Job {meta['name']} is not {owner}'s attempt {attempt}")
        for owner, owned in jobs_by_owner.items():
            if len(owned) > 1:
                self._note(self.duplicates, f"{owner} has {len(owned)} Jobs: {[j['metadata']['name'] for j in owned]}")
        for pod in pods:
            owner = pod["metadata"]["labels"][L.TRAINING_JOB]
            uids = self.pod_uids.setdefault(owner, set())
            uids.add(pod["metadata"]["uid"])
            if len(uids) == self.nodes + 1:
                self._note(self.duplicates, f"{owner} has had {len(uids)} pods for {self.nodes} nodes")
        for name, tj in tjs.items():
            self._check(name, tj, {j["metadata"]["name"]: j for j in jobs_by_owner.get(name, [])})
        return tjs

    def _check(self, name: str, tj: Obj, jobs: dict[str, Obj]) -> None:
        status = tj.get("status") or {}
        phase, attempt = status.get("phase"), int(status.get("attempt") or 0)
        seen = self.phases.setdefault(name, [])
        if phase and (not seen or seen[-1] != phase):
            seen.append(phase)
            known = [p for p in seen if p in ORDER]
            if known != seen or known != sorted(known, key=ORDER.index):
                self._note(self.untruths, f"{name}: phases {seen}")
        if attempt > 1 or int(status.get("restarts") or 0):
            self._note(self.untruths, f"{name}: attempt {attempt}, restarts {status.get('restarts')}")
        job = jobs.get(L.attempt_job_name(name, 1))
        if (attempt or C.CREATED in true_conditions(tj)) and job is None:
            self._note(self.untruths, f"{name}: attempt {attempt}, Created {sorted(true_conditions(tj))}, no Job")
        if phase == Phase.SUCCEEDED.value:
            if job is None or "Complete" not in true_conditions(job):
                self._note(self.untruths, f"{name}: Succeeded, but its Job is {job and job.get('status')}")
            if (status.get("workers") or {}).get("succeeded") != self.nodes:
                self._note(self.untruths, f"{name}: Succeeded with workers {status.get('workers')}")

    @staticmethod
    def _note(found: list[str], problem: str) -> None:
        if problem not in found:
            found.append(problem)

    def until(self, done: Callable[[dict[str, Obj]], bool], timeout: float, what: str,
              on_tick: Callable[[], None] | None = None) -> dict[str, Obj]:  # fmt: skip
        """Poll until ``done(tjs)``; the timeout fails the test with what each TrainingJob last showed."""
        deadline = time.monotonic() + timeout
        while True:
            if on_tick is not None:
                on_tick()
            tjs = self.poll()
            if done(tjs):
                return tjs
            if time.monotonic() > deadline:
                summary = {name: (tj.get("status") or {}).get("phase") for name, tj in tjs.items()}
                raise AssertionError(f"{what}: not within {timeout:.0f}s; phases {summary}")
            time.sleep(POLL_SECONDS)

    def until_all_succeeded(self, timeout: float, on_tick: Callable[[], None] | None = None) -> dict[str, Obj]:
        def done(tjs: dict[str, Obj]) -> bool:
            return all((tjs.get(name, {}).get("status") or {}).get("phase") == Phase.SUCCEEDED.value
                       for name in self.names)  # fmt: skip

        return self.until(done, timeout, f"all {len(self.names)} TrainingJobs Succeeded", on_tick)

    def assert_one_job_each_told_truthfully(self) -> None:
        """After the run: every TrainingJob succeeded on exactly one Job (attempt 1) with ``nodes`` pods, no Job
        was ever created twice, and no poll caught a status claiming what its children did not show."""
        assert not self.duplicates, self.duplicates
        assert not self.untruths, self.untruths
        expected_jobs = sorted(L.attempt_job_name(name, 1) for name in self.names)
        assert sorted(self.job_uids) == expected_jobs, sorted(self.job_uids)
        assert {name: len(self.pod_uids.get(name, ())) for name in self.names} == dict.fromkeys(self.names, self.nodes)
        tjs = self.poll()
        for name in self.names:
            status = tjs[name].get("status") or {}
            assert status.get("phase") == Phase.SUCCEEDED.value and status.get("attempt") == 1, (name, status)
            assert {C.CREATED, C.SUCCEEDED} <= true_conditions(tjs[name]), (name, status.get("conditions"))
        owned = self.cluster.kube.get(namespaced("jobs", self.namespace, group_version="batch/v1"))["items"]
        owners = sorted(ref["uid"] for job in owned for ref in job["metadata"].get("ownerReferences") or []
                        if job["metadata"]["labels"].get(L.TRAINING_JOB) in self.names)  # fmt: skip
        uids = sorted(tjs[name]["metadata"]["uid"] for name in self.names)
        assert owners == uids, "not exactly one Job owned by each TrainingJob"
