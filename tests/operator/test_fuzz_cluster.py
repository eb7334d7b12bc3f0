"""Generated TrainingJobs, created for real, against the real operator: it never crashes, never loops hot,
and always writes a status that tells the truth.

Each example is a TrainingJob from the agreement test's strategies (a valid base with a few leaves set, and
sometimes one leaf mutated out of its bounds or type), created (not dry-run) under its own name. No trainer
pod may start (they would bind the fixed host ports and cost minutes), so every example is held back one of
the two ways a user can hold a job back:
  - ``runPolicy.suspend: true``: the operator creates nothing and reports Suspended;
  - ``runPolicy.queueName`` with no Kueue running: the operator creates the ConfigMap, the Service and a
    suspended Job for Kueue to admit, and reports Queued.
What the apiserver refuses is left to test_agreement. For what it accepts, ``kiln validate``'s own parser is
the oracle: a manifest it refuses must end Failed/InvalidSpec naming a field, with no children; one it
accepts must end Suspended or Queued with exactly the children that implies. Afterwards the reconcile
counter must stand still (resyncs are 60 s apart) and the operator must be alive with no traceback logged.
"""

from __future__ import annotations

import copy
import itertools
import json
import time
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, reject, settings
from hypothesis import strategies as st
from operator_process import OperatorProcess
from prometheus_client.parser import text_string_to_metric_families

from kiln.api.base import GROUP, VERSION
from kiln.api.crd import KINDS
from kiln.api.manifest import InvalidManifest
from kiln.api.parse import parse_manifest
from kiln.api.status import ConditionType as C
from kiln.api.status import Reason as R
from kiln.operator import labels as L
from kiln.testing.controlplane import ControlPlane
from kiln.testing.kube import ApiError, namespaced
from tests.api.manifest_strategies import manifests

pytestmark = [pytest.mark.controlplane, pytest.mark.slow, pytest.mark.timeout(300)]

EXAMPLES = 18  # TrainingJobs the apiserver admits; about as many more are refused on the way
SETTLE_S = 30.0  # one reconcile is well under a second; this covers a machine shared by several test runs
QUIET_WINDOW_S = 5.0
QUEUE = "fuzz-queue"  # no Kueue runs here, so a queued Job stays suspended
HOLDS = ("suspend", "queue")
TRAINING_JOB = next(kind for kind in KINDS if kind.kind == "TrainingJob")
TJ_API = f"/apis/{GROUP}/{VERSION}"


@dataclass(frozen=True)
class Expected:
    """What the status and the children must say, decided by the oracle before the operator sees the job."""

    phase: str
    true_conditions: frozenset[str]
    children: bool
    field_paths: tuple[str, ...] = ()  # for InvalidSpec: the fields kiln validate names
    service: bool = False  # a multi-node job's rendezvous Service among the children


@dataclass(frozen=True)
class Example:
    name: str
    changes: str
    expected: Expected


def held_back(document: dict[str, Any], hold: str) -> dict[str, Any]:
    """The generated manifest with no way to start a pod, and no TTL that would delete it mid-check."""
    held = copy.deepcopy(document)
    run_policy = held["spec"].setdefault("runPolicy", {})
    if hold == "suspend":
        run_policy["suspend"] = True
    else:
        run_policy.update(suspend=False, queueName=QUEUE)
    # A small valid TTL would let the operator delete a Failed job before it is checked; an invalid one
    # (a string, a negative number) stays, for the apiserver or the models to refuse.
    if type(run_policy.get("ttlSecondsAfterFinished")) is int and run_policy["ttlSecondsAfterFinished"] >= 0:
        del run_policy["ttlSecondsAfterFinished"]
    return held


def oracle(document: dict[str, Any], hold: str) -> Expected:
    """What `kiln validate` says the operator must end with."""
    try:
        nodes = parse_manifest(document).spec.resources.nodes
    except InvalidManifest as error:
        return Expected("Failed", frozenset({C.FAILED}), False, tuple(e.field for e in error.errors if e.field))
    if hold == "suspend":
        return Expected("Suspended", frozenset({C.SUSPENDED}), False)
    return Expected("Queued", frozenset({C.CREATED, C.QUEUED}), True, service=nodes > 1)


def tj_path(namespace: str, name: str = "") -> str:
    path = f"{TJ_API}/namespaces/{namespace}/{TRAINING_JOB.plural}"
    return f"{path}/{name}" if name else path


def children(cluster: ControlPlane, namespace: str, name: str) -> dict[str, list[dict[str, Any]]]:
    selector = f"{L.TRAINING_JOB}={name}"
    found = {}
    for kind, group_version in (("jobs", "batch/v1"), ("configmaps", "v1"), ("services", "v1"), ("pods", "v1")):
        items = cluster.kube.get(namespaced(kind, namespace, group_version=group_version), labelSelector=selector)
        found[kind] = [item for item in items["items"] if not item["metadata"].get("deletionTimestamp")]
    return found


def untruths(cluster: ControlPlane, namespace: str, example: Example) -> list[str]:
    """How the TrainingJob's status and children differ from what the oracle expects (empty: truthful)."""
    expected, name = example.expected, example.name
    tj = cluster.kube.get(tj_path(namespace, name))
    status = tj.get("status") or {}
    conditions = {c["type"]: c for c in status.get("conditions") or []}
    problems = []
    if status.get("phase") != expected.phase:
        problems.append(f"phase {status.get('phase')!r}, expected {expected.phase!r}")
    holding = {type_ for type_, c in conditions.items() if c["status"] == "True"}
    if holding != expected.true_conditions:
        problems.append(f"True conditions {sorted(holding)}, expected {sorted(expected.true_conditions)}")
    failed = conditions.get(C.FAILED, {})
    if expected.phase == "Failed":
        if failed.get("reason") != R.INVALID_SPEC:
            problems.append(f"Failed reason {failed.get('reason')!r}, expected {R.INVALID_SPEC!r}")
        message = failed.get("message", "")
        if not any(path in message for path in expected.field_paths):
            problems.append(f"Failed message {message!r} names none of {expected.field_paths}")
    if status.get("observedGeneration") != tj["metadata"]["generation"]:
        problems.append(f"observedGeneration {status.get('observedGeneration')} of {tj['metadata']['generation']}")

    found = {kind: sorted(item["metadata"]["name"] for item in items)
             for kind, items in children(cluster, namespace, name).items()}  # fmt: skip
    wanted: dict[str, list[str]] = {"jobs": [], "configmaps": [], "services": [], "pods": []}
    if expected.children:
        wanted.update(jobs=[L.attempt_job_name(name, 1)], configmaps=[L.configmap_name(name)],
                      services=[L.service_name(name)] if expected.service else [])  # fmt: skip
    if found != wanted:
        problems.append(f"children {found}, expected {wanted}")
    for job in children(cluster, namespace, name)["jobs"]:
        if job["spec"].get("suspend") is not True:
            problems.append(f"Job {job['metadata']['name']} is not suspended")
    return problems


def settle(cluster: ControlPlane, namespace: str, example: Example, operator: OperatorProcess) -> list[str]:
    """Wait until the status is truthful; the last differences when it never is."""
    deadline, problems = time.monotonic() + SETTLE_S, ["never read"]
    while time.monotonic() < deadline:
        operator.check_alive()
        problems = untruths(cluster, namespace, example)
        if not problems:
            return []
        time.sleep(0.2)
    return problems


def reconciles(operator: OperatorProcess) -> float:
    families = text_string_to_metric_families(operator.metrics())
    return sum(s.value for f in families if f.name == "kiln_operator_reconcile" for s in f.samples
               if s.name == "kiln_operator_reconcile_total")  # fmt: skip


def diagnostics(cluster: ControlPlane, namespace: str, example: Example, operator_log: str) -> str:
    tj = cluster.kube.get(tj_path(namespace, example.name))
    return (f"{example.name}: {example.changes}\nexpected {example.expected}\n"
            f"spec {json.dumps(tj.get('spec'))[:1500]}\nstatus {json.dumps(tj.get('status'), indent=1)}\n"
            f"--- operator log since the test began\n{operator_log[-4000:]}")  # fmt: skip


def test_generated_trainingjobs_get_a_truthful_status(
    cluster: ControlPlane, kiln_operator: OperatorProcess, namespace: str
) -> None:
    log_start = len(kiln_operator.log())
    numbers = itertools.count(1)
    accepted: list[Example] = []

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,  # the same manifests in every CI run; widen locally with --hypothesis-seed
        database=None,
        # Every example is a real create and a wait; a failure's message already carries the manifest.
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    @given(case=manifests(TRAINING_JOB), hold=st.sampled_from(HOLDS))
    def create_and_check(case: tuple[dict[str, Any], str], hold: str) -> None:
        generated, changes = case
        name = f"fuzz-{next(numbers)}"
        document = held_back(generated, hold)
        document["metadata"] = {"name": name, "namespace": namespace}
        example = Example(name, f"{hold}; {changes}", oracle(document, hold))
        try:
            cluster.kube.request("POST", tj_path(namespace), document, params={"fieldValidation": "Strict"})
        except ApiError as error:
            if error.status not in (400, 422):
                raise
            # Refused at admission (test_agreement checks that kiln validate agrees): not counted as an
            # example, so all of them reach the operator.
            reject()
        accepted.append(example)
        problems = settle(cluster, namespace, example, kiln_operator)
        assert not problems, f"{problems}\n{diagnostics(cluster, namespace, example, kiln_operator.log()[log_start:])}"

    create_and_check()
    assert accepted, "the apiserver refused every generated TrainingJob: the fuzz test checked nothing"

    # Settled means staying settled: no later reconcile changed a status or a child.
    for example in accepted:
        problems = untruths(cluster, namespace, example)
        assert not problems, f"{problems}\n{diagnostics(cluster, namespace, example, kiln_operator.log()[log_start:])}"

    # Never loops hot: with nothing changing, only the 60-s resyncs may reconcile, at most one per job that
    # exists (the other tests' jobs too) in the window.
    before = reconciles(kiln_operator)
    time.sleep(QUIET_WINDOW_S)
    after = reconciles(kiln_operator)
    everything = cluster.kube.get(f"{TJ_API}/{TRAINING_JOB.plural}")
    bound = len(everything["items"]) + 2
    assert after - before <= bound, f"{after - before} reconciles in {QUIET_WINDOW_S}s with nothing changing"

    # Never crashes.
    kiln_operator.check_alive()
    log = kiln_operator.log()[log_start:]
    assert "Traceback" not in log, log[-6000:]
