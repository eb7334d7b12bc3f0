"""A new TrainingJob's first reconcile starts from its watch event's body instead of a read (one round trip less
on the way to its Job), so its status is written only over that very version: on the real apiserver, a
TrainingJob written in between makes the status PATCH fail with 409, and the reconcile reads it and goes again,
adopting what its first pass created. Driven in-process with the operator's own ServiceAccount credentials (the
session's operator process, if another test started it, may reconcile the same job: the outcome is the same).
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from operator_process import OperatorProcess
from test_cluster import MERGE, NOWHERE, condition, create_tj, get_tj, jobs, tj_path

from kiln.operator.credentials import from_kubeconfig
from kiln.operator.handlers import Context, run_reconcile, write_all_held, write_held_status
from kiln.operator.kube import ApiClient, ApiException, Kube
from kiln.operator.settings import Settings
from kiln.operator.workqueue import WorkQueue
from kiln.testing.controlplane import ControlPlane

pytestmark = [pytest.mark.controlplane, pytest.mark.timeout(90)]


def operator_kube(kubeconfig: Path) -> Kube:
    return Kube(ApiClient(from_kubeconfig(kubeconfig), pool_size=4))


def test_a_status_computed_from_a_stale_event_body_is_refused_then_reconciled_from_a_fresh_read(
    cluster: ControlPlane, operator_kubeconfig: Path, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    stale = create_tj(cluster, namespace, resources={"nodeSelector": NOWHERE})
    # Anything written after the event: here a label, as a user or GitOps tool might add.
    cluster.kube.patch(tj_path(namespace, "demo"), {"metadata": {"labels": {"team": "vision"}}}, content_type=MERGE)
    kube = operator_kube(operator_kubeconfig)

    with pytest.raises(ApiException) as refused:
        kube.patch_trainingjob_status(namespace, "demo", {"attempt": 0},
                                      resource_version=stale["metadata"]["resourceVersion"])  # fmt: skip
    assert refused.value.status == 409

    ctx = Context(settings=Settings(image="kiln/trainer:test", storage_root="s3://runs"), kube=kube)
    reads: list[str] = []
    read = kube.get_trainingjob
    monkeypatch.setattr(kube, "get_trainingjob", lambda ns, name: reads.append(name) or read(ns, name))
    transitions: list[Any] = []  # the Events, recorded instead of posted
    monkeypatch.setattr(kube, "post_event", lambda _body, _type, reason, _message: transitions.append(reason))

    outcome = run_reconcile(ctx, "trainingjob", namespace, "demo", unread=stale)

    assert reads == ["demo"]  # the 409, then one fresh read
    assert outcome is not None
    tj = get_tj(cluster, namespace)
    assert condition(tj, "Created")["status"] == "True" and tj["status"]["attempt"] == 1
    assert tj["metadata"]["labels"]["team"] == "vision"
    assert jobs(cluster, namespace) == ["demo-1"]
    # The session's operator, when a test before this one started it, may have reconciled the job first.
    assert transitions in ([], ["ChildrenCreated"])


@pytest.fixture
def alone(kiln_operator: OperatorProcess) -> Iterator[None]:
    """The session's operator steps aside (a clean stop releases its Lease), so that nothing else reconciles or
    writes the test's job: what is read and created is then this test's doing alone. CI saw the session's operator
    create the children before the test's first reconcile did."""
    with kiln_operator.stepped_aside():
        yield


@pytest.mark.usefixtures("alone")
def test_a_watched_body_saves_the_read_and_a_stale_one_never_acts_on_a_job(
    cluster: ControlPlane, operator_kubeconfig: Path, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Later reconciles start from the watch's latest body, which may trail the apiserver: a stale one that would
    create the Job again is not acted on but read afresh; a current one costs no read at all."""
    before_status = create_tj(cluster, namespace, resources={"nodeSelector": NOWHERE})
    kube = operator_kube(operator_kubeconfig)
    ctx = Context(settings=Settings(image="kiln/trainer:test", storage_root="s3://runs"), kube=kube)
    reads: list[str] = []
    read = kube.get_trainingjob
    monkeypatch.setattr(kube, "get_trainingjob", lambda ns, name: reads.append(name) or read(ns, name))
    created: list[str] = []
    create = kube.create_or_adopt
    monkeypatch.setattr(kube, "create_or_adopt", lambda obj: created.append(obj["kind"]) or create(obj))
    monkeypatch.setattr(kube, "post_event", lambda *_: None)

    assert run_reconcile(ctx, "trainingjob", namespace, "demo") is not None  # nothing watched: read
    assert reads == ["demo"] and sorted(created) == ["ConfigMap", "Job", "Service"]

    # The body from before the first status write: its decision would create attempt 1 again.
    ctx.watched[(namespace, "demo")] = before_status
    outcome = run_reconcile(ctx, "job", namespace, "demo")
    assert reads == ["demo", "demo"] and len(created) == 3  # read afresh instead, and nothing created
    assert outcome is not None and outcome.decision.status.attempt == 1  # (pods counted since: a status write)

    ctx.watched[(namespace, "demo")] = get_tj(cluster, namespace)  # the watch caught up
    outcome = run_reconcile(ctx, "job", namespace, "demo")
    assert reads == ["demo", "demo"] and len(created) == 3  # no read
    assert outcome is not None and outcome.decision.status.attempt == 1
    assert jobs(cluster, namespace) == ["demo-1"]


def held_new_tj(
    cluster: ControlPlane, kubeconfig: Path, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> tuple[Context, dict[str, Any], list[str], list[dict[str, Any]]]:
    """A new TrainingJob's first reconcile with its first status held, by a Context that has a queue (never used
    here). Returns it, the TrainingJob's first body, and the Events and status PATCHes it sends from then on."""
    new = create_tj(cluster, namespace, resources={"nodeSelector": NOWHERE})
    kube = operator_kube(kubeconfig)
    ctx = Context(settings=Settings(image="kiln/trainer:test", storage_root="s3://runs"), kube=kube)
    ctx.work = WorkQueue(ThreadPoolExecutor(1), slots=1)
    reasons: list[str] = []
    monkeypatch.setattr(kube, "post_event", lambda _body, _type, reason, _message: reasons.append(reason))
    patches: list[dict[str, Any]] = []
    patch = kube.patch_trainingjob_status

    def recorded(namespace: str, name: str, status: dict[str, Any], **options: Any) -> Any:
        patches.append(status)
        return patch(namespace, name, status, **options)

    monkeypatch.setattr(kube, "patch_trainingjob_status", recorded)
    run_reconcile(ctx, "trainingjob", namespace, "demo", unread=new, hold_status=True)
    return ctx, new, reasons, patches


@pytest.mark.usefixtures("alone")
def test_a_held_first_status_goes_with_the_next_reconcile_of_the_same_version(
    cluster: ControlPlane, operator_kubeconfig: Path, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    ctx, new, reasons, patches = held_new_tj(cluster, operator_kubeconfig, namespace, monkeypatch)
    assert jobs(cluster, namespace) == ["demo-1"]
    assert "status" not in get_tj(cluster, namespace) and patches == [] and reasons == []

    ctx.watched[(namespace, "demo")] = new  # nothing wrote it since: the held status still holds
    run_reconcile(ctx, "job", namespace, "demo")
    assert len(patches) == 1 and patches[0]["attempt"] == 1
    tj = get_tj(cluster, namespace)
    assert tj["status"]["attempt"] == 1 and condition(tj, "Created")["status"] == "True"
    assert reasons == ["ChildrenCreated"] and jobs(cluster, namespace) == ["demo-1"]

    write_held_status(ctx, namespace, "demo")  # its time came: nothing is left to write
    assert len(patches) == 1 and reasons == ["ChildrenCreated"]


@pytest.mark.usefixtures("alone")
def test_a_held_first_status_is_dropped_once_anything_wrote_the_trainingjob(
    cluster: ControlPlane, operator_kubeconfig: Path, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A later version (here a label, as a user or GitOps tool might add) is decided afresh from what is stored:
    the children are adopted, not created twice, and the Events are told once."""
    ctx, _, reasons, patches = held_new_tj(cluster, operator_kubeconfig, namespace, monkeypatch)
    labelled = cluster.kube.patch(tj_path(namespace, "demo"), {"metadata": {"labels": {"team": "vision"}}},
                                  content_type=MERGE)  # fmt: skip

    ctx.watched[(namespace, "demo")] = labelled
    run_reconcile(ctx, "job", namespace, "demo")
    tj = get_tj(cluster, namespace)
    assert tj["status"]["attempt"] == 1 and tj["metadata"]["labels"]["team"] == "vision"
    assert len(patches) == 1 and reasons == ["ChildrenCreated"] and jobs(cluster, namespace) == ["demo-1"]

    write_held_status(ctx, namespace, "demo")
    assert len(patches) == 1 and reasons == ["ChildrenCreated"]


@pytest.mark.usefixtures("alone")
def test_a_clean_stop_writes_the_held_first_statuses(
    cluster: ControlPlane, operator_kubeconfig: Path, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    ctx, _, reasons, patches = held_new_tj(cluster, operator_kubeconfig, namespace, monkeypatch)
    assert "status" not in get_tj(cluster, namespace)

    write_all_held(ctx)  # what the operator's clean-up does
    assert get_tj(cluster, namespace)["status"]["attempt"] == 1 and ctx.held == {}
    assert len(patches) == 1 and reasons == ["ChildrenCreated"]
