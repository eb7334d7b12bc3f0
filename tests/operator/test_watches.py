"""The watches outside kopf: where they watch, what a relist tells, and the watch itself on the real
apiserver with the operator's own credentials (label selector, metadata only, a relist after a gap, a prompt
stop)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
from tj_builders import body as trainingjob
from tj_builders import resolved_from

from kiln.operator.credentials import from_kubeconfig
from kiln.operator.kube import ApiClient, ApiException, Kube
from kiln.operator.render import render_configmap, render_job, render_service
from kiln.operator.settings import Settings
from kiln.operator.watches import (
    CONFIGMAPS,
    JOBS,
    OWN_CHILDREN,
    Gone,
    ListWatch,
    Watches,
    relisted,
    scopes,
)
from kiln.testing.controlplane import ControlPlane
from kiln.testing.kube import namespaced
from kiln.testing.processes import wait_until

Obj = dict[str, Any]


def meta(name: str, uid: str, namespace: str = "ns") -> Obj:
    return {"metadata": {"namespace": namespace, "name": name, "uid": uid, "labels": {"a": "b"}}}


def test_every_child_carries_the_label_the_watches_select() -> None:
    resolved = resolved_from(trainingjob())
    key, value = OWN_CHILDREN.split("=")
    for child in (render_configmap(resolved), render_service(resolved), render_job(resolved, 1, Settings())):
        assert child["metadata"]["labels"][key] == value


def test_literal_namespaces_are_watched_each_and_patterns_cluster_wide_by_kopfs_rules() -> None:
    where, keep = scopes(("team-a", "team-b"))
    assert where == ("team-a", "team-b") and keep("anything")
    assert scopes(())[0] == (None,)
    where, keep = scopes(("team-*, !team-x", "ops"))
    assert where == (None,)
    assert [keep(ns) for ns in ("team-a", "team-x", "ops", "default")] == [True, False, True, False]
    assert [scopes(("!kube-*",))[1](ns) for ns in ("kube-system", "ml")] == [False, True]


def test_a_relist_tells_what_changed_during_the_gap() -> None:
    known = {("ns", name): meta(name, uid) for name, uid in (("kept", "1"), ("gone", "2"), ("replaced", "3"))}
    listed = [meta("kept", "1"), meta("replaced", "4"), meta("new", "5")]

    events = [(type, obj["metadata"]["name"], obj["metadata"]["uid"]) for type, obj in relisted(known, listed)]

    assert events == [("DELETED", "gone", "2"), ("MODIFIED", "kept", "1"), ("DELETED", "replaced", "3"),
                      ("ADDED", "replaced", "4"), ("ADDED", "new", "5")]  # fmt: skip


def test_a_410_in_the_stream_means_list_again_and_other_errors_are_api_errors() -> None:
    watch = ListWatch(Kube.__new__(Kube), JOBS, "ns", lambda *_: None, lambda _: True)
    with pytest.raises(Gone):
        watch._event({"type": "ERROR", "object": {"kind": "Status", "code": 410, "reason": "Expired"}})
    with pytest.raises(ApiException) as error:
        watch._event({"type": "ERROR", "object": {"kind": "Status", "code": 500, "reason": "InternalError"}})
    assert error.value.status == 500
    watch._event({"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "42"}}})
    assert watch.version == "42" and watch.known == {}


class EmptyWatches:
    """A server whose every watch ends at once, empty (and whose lists are empty)."""

    def __init__(self) -> None:
        self.watches = 0

    def request(self, *_: object, **__: object) -> Obj:
        return {"metadata": {"resourceVersion": "1"}, "items": []}

    def stream(self, *_: object) -> Any:
        self.watches += 1
        return EmptyStream()


class EmptyStream:
    def __iter__(self) -> Any:
        return iter(())

    def release_conn(self) -> None:
        pass


def test_a_server_that_ends_every_watch_at_once_is_not_asked_in_a_hot_loop() -> None:
    server = EmptyWatches()
    watch = ListWatch(server, JOBS, "ns", lambda *_: None, lambda _: True)  # type: ignore[arg-type]
    thread = threading.Thread(target=watch.run, daemon=True)
    thread.start()
    time.sleep(2.5)
    watch.stop()
    thread.join(3)
    assert 2 <= server.watches <= 4 and not thread.is_alive()  # about one a second


@pytest.mark.controlplane
@pytest.mark.timeout(90)
def test_the_watch_on_the_real_apiserver(cluster: ControlPlane, operator_kubeconfig: Path, namespace: str) -> None:
    kube = Kube(ApiClient(from_kubeconfig(operator_kubeconfig), pool_size=4))
    ours = {"app.kubernetes.io/managed-by": "kiln-operator", "kiln.dev/training-job": "demo"}
    configmaps = namespaced("configmaps", namespace)

    def configmap(name: str, labels: dict[str, str]) -> None:
        cluster.kube.create(configmaps, {"metadata": {"name": name, "labels": labels}, "data": {"k": "v" * 1000}})

    configmap("before", ours)
    configmap("not-ours", {"kiln.dev/training-job": "demo"})
    seen: list[tuple[str, str, Obj]] = []
    handlers = {CONFIGMAPS: lambda type, obj: seen.append((type, obj["metadata"]["name"], obj))}
    watches = Watches(kube, (namespace,), handlers)
    watches.start()
    names = lambda: [(type, name) for type, name, _ in seen]  # noqa: E731
    try:
        wait_until(lambda: ("ADDED", "before") in names(), timeout=15, what="the listed ConfigMap")
        configmap("after", ours)
        cluster.kube.patch(f"{configmaps}/after", {"metadata": {"annotations": {"x": "y"}}})
        cluster.kube.delete(f"{configmaps}/before")
        wait_until(lambda: ("DELETED", "before") in names(), timeout=15, what="the watched deletion")
        assert names() == [("ADDED", "before"), ("ADDED", "after"), ("MODIFIED", "after"), ("DELETED", "before")]
        assert all("data" not in obj for _, _, obj in seen)  # metadata only
    finally:
        started = time.monotonic()
        watches.stop()
        stopped_in = time.monotonic() - started
    assert stopped_in < 3 and not any(thread.is_alive() for thread in watches.threads)

    # A gap, as after a 410: what was deleted meanwhile is told as DELETED by the relist.
    cluster.kube.delete(f"{configmaps}/after")
    configmap("during", ours)
    (watch,) = watches.watches
    watch.version, watch.stopping = None, threading.Event()
    seen.clear()
    thread = threading.Thread(target=watch.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: len(seen) >= 2, timeout=15, what="the relist")
        assert sorted(names()) == [("ADDED", "during"), ("DELETED", "after")]
    finally:
        watch.stop()
        thread.join(5)
