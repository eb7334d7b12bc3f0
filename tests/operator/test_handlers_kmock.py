"""Fast tier: the operator's real kopf registry, in-process, against kmock's in-memory KubernetesEmulator.

kmock stores objects as plain JSON and streams watch events, but runs no controllers and sets no uid,
resourceVersion or generation: the tests create TrainingJobs with those metadata fields filled in, and play
the Job controller themselves by patching a Job's status (and creating a failed pod) over HTTP, so the
operator sees the change through its watch exactly as it would from a real apiserver.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import kmock
import kopf
import pytest
import pytest_asyncio
from tj_builders import body

from kiln.operator import labels as L
from kiln.operator.background import RETRY_DELAY_S
from kiln.operator.handlers import Context, build_registry
from kiln.operator.held import FIRST_STATUS_MAX_HOLD_S, FIRST_STATUS_QUIET_S, held_due
from kiln.operator.progress import poll_progress
from kiln.operator.settings import Settings
from kiln.operator.watches import TRAININGJOBS
from kiln.testing.processes import free_port

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(30)]

NS = "ml"
TJ = "/apis/kiln.dev/v1alpha1/namespaces/ml/trainingjobs"
JOBS = "/apis/batch/v1/namespaces/ml/jobs"
SETTINGS = Settings(image="kiln/trainer:test", storage_root="s3://runs")


def kubeconfig(path: Path, server: str) -> Path:
    """A plain-HTTP kubeconfig: both kopf's login and the operator's own client read it."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "kmock", "cluster": {"server": server}}],
        "users": [{"name": "kmock", "user": {"token": "kmock"}}],
        "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "kmock"}}],
        "current-context": "kmock",
    }
    path.write_text(json.dumps(config))
    return path


@pytest_asyncio.fixture
async def operator(
    kmock: kmock.KubernetesEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Context]:
    kmock.resources.load_bundled()  # the built-in kinds (jobs, pods, configmaps, services, events)
    for kind in ("TrainingJob", "ExportJob"):
        kmock.resources[f"kiln.dev/v1alpha1/{kind.lower()}s"] = kmock.ResourceInfo(
            kind=kind,
            singular=kind.lower(),
            namespaced=True,
            verbs={"get", "list", "watch", "create", "patch", "delete"},
            subresources={"status"},
        )
    path = kubeconfig(tmp_path / "kubeconfig", str(kmock.url).rstrip("/"))
    monkeypatch.setenv("KUBECONFIG", str(path))
    registry, ctx = build_registry(Settings(**{**SETTINGS.__dict__, "metrics_port": free_port()}))
    task = asyncio.create_task(
        # Cluster-wide: with namespaces=[...] kopf lists /api/v1/namespaces, a path kmock 0.8 fails to parse
        # (ValueError in kmock._internal.parsing.parse_path, answered as HTTP 500).
        kopf.operator(registry=registry, standalone=True, clusterwide=True)
    )
    await until(ctx.metrics.ready.is_set, "operator ready")
    try:
        yield ctx
    finally:
        # Cancelled, not stopped with a stop_flag: a graceful kopf stop waits 5 s on kmock's open watch
        # streams. The cleanup hook is skipped then, so stop what it would have stopped.
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, timeout=10)
        if ctx.background is not None:
            await ctx.background.stop()
        if ctx.watches is not None:
            await asyncio.to_thread(ctx.watches.stop)
        if ctx.work is not None:
            ctx.work.close()
        if ctx.server is not None:
            await ctx.server.cleanup()


async def until(check: Callable[[], Any], what: str, timeout: float = 5.0) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while not (result := check()):
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)
    return result


async def send(server: kmock.KubernetesEmulator, method: str, path: str, payload: dict[str, Any]) -> None:
    async with aiohttp.ClientSession(base_url=str(server.url)) as session:
        headers = {"Content-Type": "application/merge-patch+json"} if method == "PATCH" else {}
        async with session.request(method, path, json=payload, headers=headers) as response:
            assert response.status < 300, await response.text()


def stored(server: kmock.KubernetesEmulator, resource: str, name: str) -> dict[str, Any] | None:
    for (res, namespace, obj_name), obj in server.objects.items():
        if str(res.plural) == resource and namespace == NS and obj_name == name and not obj.deleted:
            return dict(obj.raw)
    return None


def phase_of(server: kmock.KubernetesEmulator, name: str = "demo") -> str | None:
    tj = stored(server, "trainingjobs", name) or {}
    return (tj.get("status") or {}).get("phase")


def events(server: kmock.KubernetesEmulator) -> list[dict[str, Any]]:
    """Events as posted: kopf names them by generateName, which kmock 0.8 stores under one key (409s)."""
    return [r.data for r in server["post"] if r.resource is not None and str(r.resource.plural) == "events"]


async def create_tj(server: kmock.KubernetesEmulator, **spec: Any) -> dict[str, Any]:
    document = body(uid="uid-demo", **spec)  # kmock sets no uid/generation: the body carries them
    document["spec"]["resources"] = {"nodes": 2, "gpusPerNode": 1}
    await send(server, "POST", TJ, document)
    return document


async def test_valid_trainingjob_gets_its_children_and_status_created(
    kmock: kmock.KubernetesEmulator, operator: Context
) -> None:
    await create_tj(kmock)
    job = await until(lambda: stored(kmock, "jobs", L.attempt_job_name("demo", 1)), "the attempt Job")
    await until(lambda: phase_of(kmock) == "Pending", "phase Pending")
    configmap, service = (
        stored(kmock, "configmaps", L.configmap_name("demo")),
        stored(kmock, "services", L.service_name("demo")),
    )
    assert configmap is not None and service is not None
    for child in (configmap, service, job):
        owner = child["metadata"]["ownerReferences"][0]
        assert (owner["kind"], owner["name"], owner["uid"], owner["controller"]) == (
            "TrainingJob",
            "demo",
            "uid-demo",
            True,
        )
        assert child["metadata"]["labels"]["kiln.dev/training-job"] == "demo"
    tj = stored(kmock, "trainingjobs", "demo") or {}
    conditions = {c["type"]: c for c in tj["status"]["conditions"]}
    assert conditions["Created"]["status"] == "True" and tj["status"]["attempt"] == 1
    # The Event is posted after the status patch, so it may trail the phase by a moment.
    await until(lambda: events(kmock), "the Created Event")
    assert [e["reason"] for e in events(kmock)] == ["ChildrenCreated"]
    assert "finalizers" not in tj["metadata"]  # no kopf timer/daemon asks for one


async def test_invalid_trainingjob_fails_with_the_field_path_an_event_and_no_children(
    kmock: kmock.KubernetesEmulator, operator: Context
) -> None:
    await create_tj(kmock, epochs=-1)
    await until(lambda: phase_of(kmock) == "Failed", "phase Failed")
    tj = stored(kmock, "trainingjobs", "demo") or {}
    failed = next(c for c in tj["status"]["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "InvalidSpec" and "spec.epochs" in failed["message"]
    await until(lambda: [e for e in events(kmock) if e["reason"] == "InvalidSpec"], "an InvalidSpec Event")
    assert not [key for key in kmock.objects if str(key[0].plural) in ("jobs", "configmaps", "services")]


async def test_a_misspelt_name_fails_as_invalid_spec_with_the_closest_names_and_no_children(
    kmock: kmock.KubernetesEmulator, operator: Context
) -> None:
    await create_tj(kmock, optimizer__name="adamx")
    await until(lambda: phase_of(kmock) == "Failed", "phase Failed")
    tj = stored(kmock, "trainingjobs", "demo") or {}
    failed = next(c for c in tj["status"]["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "InvalidSpec"
    assert "spec.optimizer.name: unknown optimizer 'adamx'; did you mean" in failed["message"]
    assert "adamw" in failed["message"]
    assert not [key for key in kmock.objects if str(key[0].plural) in ("jobs", "configmaps", "services")]


async def test_a_complete_job_makes_the_trainingjob_succeeded(
    kmock: kmock.KubernetesEmulator, operator: Context
) -> None:
    await create_tj(kmock)
    job = L.attempt_job_name("demo", 1)
    await until(lambda: phase_of(kmock) == "Pending", "phase Pending")
    complete = [{"type": "Complete", "status": "True", "reason": "CompletionsReached"}]
    await send(kmock, "PATCH", f"{JOBS}/{job}/status", {"status": {"succeeded": 2, "conditions": complete}})
    await until(lambda: phase_of(kmock) == "Succeeded", "phase Succeeded")
    tj = stored(kmock, "trainingjobs", "demo") or {}
    assert tj["status"]["completionTime"] and tj["status"]["workers"]["succeeded"] == 2
    await until(lambda: any(e["reason"] == "JobCompleted" for e in events(kmock)), "the JobCompleted Event")
    # One Event per transition, even where kopf handles the creation twice (test_known_current_body); the creation
    # Event may trail its own status patch (see above), so no order is asserted.
    reasons = [e["reason"] for e in events(kmock)]
    assert (reasons.count("ChildrenCreated"), reasons.count("JobCompleted")) == (1, 1), reasons


async def test_a_creation_redelivered_on_a_stale_event_changes_nothing(
    kmock: kmock.KubernetesEmulator, operator: Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A TrainingJob's creation event delivered again after its status moved on (a watch that restarts from an
    older list, or kopf's own redelivery) must not roll the status back to Pending or repeat its Events: its
    generation was reconciled already, so the event changes nothing."""
    created = await create_tj(kmock)
    complete = [{"type": "Complete", "status": "True", "reason": "CompletionsReached"}]
    await until(lambda: phase_of(kmock) == "Pending", "phase Pending")
    job = L.attempt_job_name("demo", 1)
    await send(kmock, "PATCH", f"{JOBS}/{job}/status", {"status": {"succeeded": 2, "conditions": complete}})
    await until(lambda: any(e["reason"] == "JobCompleted" for e in events(kmock)), "the JobCompleted Event")
    status = stored(kmock, "trainingjobs", "demo")["status"]  # type: ignore[index]

    # The creation event again, into the running operator's TrainingJob watch handler; the spy records the Events.
    assert operator.watches is not None
    watch = next(w for w in operator.watches.watches if w.kind is TRAININGJOBS)
    reasons: list[str] = []
    reconciles = operator.metrics.reconciles.labels("trainingjob", "ok")
    before = reconciles._value.get()
    monkeypatch.setattr(operator.kube, "post_event", lambda _body, _type, reason, _message: reasons.append(reason))
    watch.handler("ADDED", created)
    await asyncio.sleep(0.5)  # kmock answers in milliseconds: a reconcile wrongly started would be done

    assert reconciles._value.get() == before
    assert reasons == []
    assert stored(kmock, "trainingjobs", "demo")["status"] == status  # type: ignore[index]


async def test_a_new_generation_is_reconciled_and_a_metadata_change_is_not(
    kmock: kmock.KubernetesEmulator, operator: Context
) -> None:
    """TrainingJob events trigger a reconcile only for a generation this operator has not reconciled (kmock keeps
    no generations, so the patches below bump it as the apiserver does for a spec change)."""
    await create_tj(kmock)
    job = L.attempt_job_name("demo", 1)
    await until(lambda: events(kmock), "the Created Event")  # posted after the reconcile was counted
    reconciles = operator.metrics.reconciles.labels("trainingjob", "ok")
    before = reconciles._value.get()

    await send(kmock, "PATCH", f"{TJ}/demo", {"metadata": {"labels": {"team": "vision"}}})
    spec_change = {"metadata": {"generation": 2}, "spec": {"runPolicy": {"activeDeadlineSeconds": 600}}}
    await send(kmock, "PATCH", f"{TJ}/demo", spec_change)
    deadline = await until(
        lambda: (stored(kmock, "jobs", job) or {})["spec"].get("activeDeadlineSeconds"), "a deadline"
    )
    assert 0 < deadline <= 600
    # Counted just after the deadline lands; then a moment for any reconcile that the label, or the status writes
    # that followed, had wrongly started (kmock answers in milliseconds).
    await until(lambda: reconciles._value.get() > before, "the spec change's reconcile counted")
    await asyncio.sleep(0.5)
    assert reconciles._value.get() == before + 1  # the spec change, not the label


async def test_exit_137_restarts_the_gang_as_a_new_attempt(kmock: kmock.KubernetesEmulator, operator: Context) -> None:
    await create_tj(kmock)
    first = L.attempt_job_name("demo", 1)
    await until(lambda: stored(kmock, "jobs", first), "attempt 1")
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"{first}-0-abcde",
            "namespace": NS,
            "labels": {L.TRAINING_JOB: "demo", L.ATTEMPT: "1"},
            "annotations": {L.COMPLETION_INDEX_ANNOTATION: "0"},
        },
        "status": {
            "phase": "Failed",
            "containerStatuses": [
                {"name": "trainer", "state": {"terminated": {"exitCode": 137, "finishedAt": "2026-01-01T00:00:00Z"}}}
            ],
        },
    }
    await send(kmock, "POST", f"/api/v1/namespaces/{NS}/pods", pod)
    failed = [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]
    await send(kmock, "PATCH", f"{JOBS}/{first}/status", {"status": {"failed": 1, "conditions": failed}})
    await until(lambda: stored(kmock, "jobs", L.attempt_job_name("demo", 2)), "attempt 2's Job")
    await until(lambda: phase_of(kmock) == "Restarting", "phase Restarting")
    status = (stored(kmock, "trainingjobs", "demo") or {})["status"]
    assert (status["attempt"], status["restarts"]) == (2, 1)
    restarting = next(c for c in status["conditions"] if c["type"] == "Restarting")
    assert restarting["status"] == "True" and "137" in restarting["message"]


def plural(request: Any) -> str | None:
    return str(request.resource.plural) if request.resource is not None else None


async def test_progress_polls_list_an_attempts_pods_once_not_every_poll(
    kmock: kmock.KubernetesEmulator, operator: Context
) -> None:
    """A pod list by label reads every pod in the namespace: one per poll made polling quadratic in the number
    of running jobs. Rank 0's address is looked up once per attempt (its pod is never replaced)."""
    rank0 = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"{L.attempt_job_name('demo', 1)}-0-abcde",
            "namespace": NS,
            "labels": {L.TRAINING_JOB: "demo", L.ATTEMPT: "1"},
            "annotations": {L.COMPLETION_INDEX_ANNOTATION: "0"},
        },
        # TEST-NET-1 (RFC 5737): nothing answers there, so each poll fails after finding the address.
        "status": {"phase": "Running", "podIP": "192.0.2.1"},
    }
    await send(kmock, "POST", f"/api/v1/namespaces/{NS}/pods", rank0)
    assert operator.kube is not None
    running = {"metadata": {"namespace": NS, "name": "demo"}, "status": {"attempt": 1}}
    for _ in range(3):
        with pytest.raises(OSError):
            await asyncio.to_thread(poll_progress, operator.kube, running, 0.5, operator.rank0)
    assert len([r for r in kmock["get"] if plural(r) == "pods"]) == 1
    next_attempt = {**running, "status": {"attempt": 2}}  # no pod yet: nothing to poll, and nothing remembered
    assert await asyncio.to_thread(poll_progress, operator.kube, next_attempt, 0.5, operator.rank0) == {}
    assert len([r for r in kmock["get"] if plural(r) == "pods"]) == 2
    operator.rank0.forget(NS, "demo")
    assert len(operator.rank0) == 0


def status_patches(server: kmock.KubernetesEmulator) -> list[dict[str, Any]]:
    """The TrainingJob status PATCHes sent, their statuses in order."""
    return [
        r.data["status"]
        for r in server["patch"]
        if r.resource is not None and str(r.resource.plural) == "trainingjobs" and str(r.url).endswith("/status")
    ]


async def test_a_new_trainingjobs_first_status_waits_and_goes_with_its_jobs_first_update(
    kmock: kmock.KubernetesEmulator, operator: Context
) -> None:
    """The first status of a new TrainingJob is held back once its children exist (a status PATCH right after a
    create slowed the next creations' events, docs/benchmarks.md); the Job update's reconcile writes it with its
    own, in one PATCH, and the Events of both are posted once."""
    await create_tj(kmock)
    first = L.attempt_job_name("demo", 1)
    await until(lambda: stored(kmock, "jobs", first), "attempt 1")
    await asyncio.sleep(0.3)  # kmock answers in milliseconds: a status written at once would be here
    assert status_patches(kmock) == [] and phase_of(kmock) is None

    await send(kmock, "PATCH", f"{JOBS}/{first}/status", {"status": {"active": 2, "ready": 2}})
    await until(lambda: phase_of(kmock) == "Running", "phase Running")
    await asyncio.sleep(FIRST_STATUS_QUIET_S + 0.5)  # the held write's turn comes, and finds nothing left
    [patch] = status_patches(kmock)
    assert patch["attempt"] == 1 and patch["phase"] == "Running"
    assert {c["type"]: c["status"] for c in patch["conditions"]}["Created"] == "True"
    assert sorted(e["reason"] for e in events(kmock)) == ["ChildrenCreated", "PodsRunning"]


async def test_a_held_first_status_is_written_once_its_delay_ends(
    kmock: kmock.KubernetesEmulator, operator: Context
) -> None:
    await create_tj(kmock)
    await until(lambda: stored(kmock, "jobs", L.attempt_job_name("demo", 1)), "attempt 1")
    assert phase_of(kmock) is None
    await until(lambda: phase_of(kmock) == "Pending", "phase Pending", timeout=FIRST_STATUS_QUIET_S + 3)
    await until(lambda: events(kmock) != [], "its Event")  # posted after the status PATCH, not with it
    await asyncio.sleep(0.3)  # a second write or Event would be here by now
    assert len(status_patches(kmock)) == 1
    assert [e["reason"] for e in events(kmock)] == ["ChildrenCreated"]


async def test_a_job_updates_reconcile_that_fails_is_retried_in_seconds_not_at_the_next_resync(
    kmock: kmock.KubernetesEmulator, operator: Context
) -> None:
    """An API error (here a 500 on the status PATCH) in the reconcile of a Job update is retried, as a resync that
    reads the TrainingJob, RETRY_DELAY_S later; left to the 60 s resync, a short attempt could start and end unseen.
    (kmock stores a change it answers with an error, so the retry is seen by its read, not by the phase.)"""
    assert operator.settings.resync_interval_s >= 60
    await create_tj(kmock)
    first = L.attempt_job_name("demo", 1)
    await until(lambda: phase_of(kmock) == "Pending", "phase Pending", timeout=FIRST_STATUS_QUIET_S + 3)
    # kmock's slices count every request the criterion sees: the first status PATCH (Pending) was the 0th.
    failing = kmock[f"patch {TJ}/demo/status"][1:2] << 500
    await send(kmock, "PATCH", f"{JOBS}/{first}/status", {"status": {"active": 2, "ready": 2}})
    await until(lambda: list(failing), "the failed status PATCH")
    reads_before = len(list(kmock["get"]))

    def reads_since() -> list[Any]:
        return [r for r in list(kmock["get"])[reads_before:] if str(r.url).endswith(f"{TJ}/demo")]

    await until(reads_since, "the retry's read of the TrainingJob", timeout=RETRY_DELAY_S + 5)


async def test_a_held_first_status_is_due_once_creations_pause_or_after_the_longest_hold() -> None:
    quiet, longest = FIRST_STATUS_QUIET_S, FIRST_STATUS_MAX_HOLD_S
    assert held_due(since=100.0, last_creation=100.0) == 100.0 + quiet  # a lone TrainingJob
    assert held_due(since=100.0, last_creation=103.0) == 103.0 + quiet  # a burst still going on moves it
    assert held_due(since=100.0, last_creation=100.0 + longest) == 100.0 + longest  # creations that never pause
