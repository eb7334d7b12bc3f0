"""Which spec an attempt runs: the digest, its Job annotations, and one reconcile loop around an edit."""

from __future__ import annotations

import copy
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, cast

from tj_builders import SETTINGS, body, resolved_from

from kiln.operator.changes import (
    SPEC_DIGEST,
    SPEC_EPOCHS,
    SPEC_GENERATION,
    applied_spec,
    changed_sections,
    from_annotations,
    spec_sections,
)
from kiln.operator.kube import Kube
from kiln.operator.reconcile import reconcile
from kiln.operator.render import render_job
from kiln.operator.status import job_view

Obj = dict[str, Any]
NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def test_sections_hash_the_users_spec_and_leave_out_run_policy_the_operator_applies() -> None:
    spec = body()["spec"]
    base = spec_sections(spec)
    assert set(base) == set(spec) and all(len(h) == 10 for h in base.values())
    immediate = {"suspend": True, "maxRestarts": 7, "retriableExitCodes": [3], "activeDeadlineSeconds": 60,
                 "ttlSecondsAfterFinished": 5}  # fmt: skip
    assert spec_sections({**spec, "runPolicy": immediate}) == spec_sections({**spec, "runPolicy": {}})
    for pod_field in ({"queueName": "q"}, {"priorityClassName": "high"}, {"terminationGracePeriodSeconds": 30}):
        assert spec_sections({**spec, "runPolicy": pod_field}) != spec_sections({**spec, "runPolicy": {}})
    # Key order never matters.
    assert spec_sections(dict(reversed(list(spec.items())))) == base


def test_changed_sections_and_the_generation_guard() -> None:
    spec = body()["spec"]
    old = applied_spec(spec, 1, 3)
    new = applied_spec({**spec, "seed": 4, "optimizer": {"lr": 0.1}}, 2, 3)
    assert changed_sections(new, old) == ("optimizer", "seed")
    # The same generation is the same spec, even if an upgraded CRD's read-time defaults add a field.
    assert changed_sections(applied_spec({**spec, "compile": False}, 1, 3), old) == ()
    removed = applied_spec({k: v for k, v in spec.items() if k != "epochs"}, 2, 10)
    assert changed_sections(removed, old) == ("epochs",)


def test_the_job_records_what_it_runs_and_job_view_reads_it_back() -> None:
    applied = applied_spec(body()["spec"], 4, 3)
    job = render_job(resolved_from(body()), 2, SETTINGS, applied=applied)
    annotations = job["metadata"]["annotations"]
    assert annotations[SPEC_GENERATION] == "4" and annotations[SPEC_EPOCHS] == "3"
    assert annotations[SPEC_DIGEST].startswith("{") and len(annotations[SPEC_DIGEST]) < 400
    assert job_view(job).applied == applied
    assert "annotations" not in render_job(resolved_from(body()), 2, SETTINGS)["metadata"]
    assert from_annotations({SPEC_DIGEST: "not json", SPEC_EPOCHS: "3"}) is None
    assert from_annotations(None) is None


class FakeKube:
    """Just enough of Kube for reconcile(): stores what it is sent, serves Jobs back with a settable status."""

    def __init__(self) -> None:
        self.jobs: dict[str, Obj] = {}
        self.status_patches: list[Obj] = []

    def concurrently(self, *calls: Callable[[], Obj]) -> list[Obj]:
        return [call() for call in calls]

    def apply_configmap(self, obj: Obj) -> Obj:
        return obj

    def create_or_adopt(self, obj: Obj) -> Obj:
        if obj["kind"] == "Job":
            self.jobs.setdefault(obj["metadata"]["name"], copy.deepcopy(obj))
        return obj

    def get_job(self, namespace: str, name: str) -> Obj | None:
        return self.jobs.get(name)

    def attempt_pods(self, namespace: str, job_name: str, attempt: int) -> list[Obj]:
        return []

    def patch_trainingjob_status(
        self, namespace: str, name: str, patch: Obj, *, resource_version: str | None = None
    ) -> Obj:
        self.status_patches.append(patch)
        return patch


def test_an_edit_to_a_running_job_waits_for_the_next_attempt_through_reconcile() -> None:
    kube = FakeKube()
    tj = body()
    first = reconcile(cast(Kube, kube), SETTINGS, tj, now=NOW)
    assert first.decision.create_attempt == 1
    tj["status"] = first.decision.status.to_dict()
    assert tj["status"]["observedGeneration"] == 1
    kube.jobs["demo-1"]["status"] = {"active": 2, "ready": 2, "startTime": "2026-01-01T11:59:00Z"}

    tj["spec"]["optimizer"] = {"lr": 0.01}
    tj["metadata"]["generation"] = 2
    edited = reconcile(cast(Kube, kube), SETTINGS, tj, now=NOW)
    assert edited.decision.create_attempt is None
    assert edited.decision.status.observed_generation == 1 and "observedGeneration" not in kube.status_patches[-1]
    pending = next(c for c in kube.status_patches[-1]["conditions"] if c["type"] == "SpecChangePending")
    assert pending["status"] == "True" and pending["reason"] == "AppliesAtNextAttempt"
    assert pending["message"].startswith("optimizer changed in generation 2; attempt 1 runs generation 1")
