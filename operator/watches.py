"""The operator's watches of its TrainingJobs and of their children (Jobs, ConfigMaps, Services), outside kopf.

kopf runs every watch event through its per-object pipeline on the event loop: decoding, a worker task and
memory per object, handler selection, a logger. None of it serves these kinds. A TrainingJob event needs one
question answered (``triggers.Generations``: is this a generation not yet reconciled here?), and most are the
operator's own status writes, for which the answer is no; most child events change nothing the operator reads
(``triggers.JobStates``), and a ConfigMap or Service matters only once it is gone. In a burst of new
TrainingJobs that pipeline was most of the operator's CPU on the event loop (docs/benchmarks.md, "CR → Job
against a floor controller").

So each kind is one LIST then WATCH per scope in a thread of its own, as client-go's reflector does it. The
apiserver filters the children on the label every child carries (``OWN_CHILDREN``) and sends ConfigMaps and
Services as metadata only. A watch resumes from the last resourceVersion seen (bookmarks keep it current), and
a 410 Gone lists again, telling the objects that vanished meanwhile as DELETED events.

The watches run only where kopf does (the Lease holder), which keeps ExportJobs (their create and resume
handlers), and stop with it; the work they trigger goes through a ``workqueue.WorkQueue`` to the handlers'
threads.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import urllib3
from kopf._cogs.structs.references import match_namespace  # kopf's own pattern rules, so both watch the same

from kiln.operator import labels as L
from kiln.operator.kube import ApiException, Kube

Obj = dict[str, Any]
Key = tuple[str, str]
Handler = Callable[[str, Obj], None]
"""(event type, object): called on the watch's thread, so it must not block."""
log = logging.getLogger(__name__)

OWN_CHILDREN = f"{L.MANAGED_BY}={L.MANAGER}"
"""The label selector of each child kind's watch: every TrainingJob's and ExportJob's child has it, and a
cluster holds many more Jobs, ConfigMaps (every namespace's kube-root-ca.crt) and Services that would all be sent
and decoded."""
WATCH_TIMEOUT_S = 300
"""The apiserver ends each watch after this long (the watch then resumes): watches stall silently behind some
load balancers (nolar/kopf#585, #847)."""
READ_TIMEOUT_S = WATCH_TIMEOUT_S + 30
"""Silence for this long means a dead connection: bookmarks and the server's own end come well before it."""
MIN_WATCH_S = 1.0
"""A watch that the server ended sooner than this is followed by this long a pause before the next."""
LIST_PAGE = 500
"""Objects per LIST page: bounds the size of one response at 1,000s of children."""
MAX_BACKOFF_S = 5.0
"""The longest wait between failed attempts to list or watch (the first waits 1 s, each next one twice as long): a
restarted apiserver is watched again within 5 s of its return, at one request per 5 s while it is away."""
METADATA = "application/json;as={};g=meta.k8s.io;v=v1,application/json"
"""Accept header of a metadata-only LIST or WATCH, falling back to whole objects where a server offers none."""
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


@dataclass(frozen=True)
class Kind:
    plural: str
    api: str
    """The path prefix of its API group and version."""
    metadata_only: bool
    """Whether the handler reads only metadata: the apiserver then sends PartialObjectMetadata."""
    children: bool = True
    """Whether only the operator's own are watched (``OWN_CHILDREN``); a custom resource's are all watched."""


TRAININGJOBS = Kind(L.TJ_PLURAL, f"/apis/{L.TJ_GROUP}/{L.TJ_VERSION}", metadata_only=False, children=False)
JOBS = Kind("jobs", "/apis/batch/v1", metadata_only=False)
CONFIGMAPS = Kind("configmaps", "/api/v1", metadata_only=True)
SERVICES = Kind("services", "/api/v1", metadata_only=True)


def scopes(namespaces: Iterable[str]) -> tuple[tuple[str | None, ...], Callable[[str], bool]]:
    """Where to watch for kopf's namespace patterns (Settings.namespaces), and which namespaces to keep: each
    namespace named literally gets its own watch; any glob or negation means one cluster-wide watch, filtered by
    kopf's rules; none means the whole cluster (None)."""
    patterns = tuple(namespaces)
    if patterns and all(_DNS_LABEL.fullmatch(p) for p in patterns):
        return patterns, lambda _: True
    if not patterns:
        return (None,), lambda _: True
    return (None,), lambda namespace: any(match_namespace(namespace, p) for p in patterns)


def relisted(known: dict[Key, Obj], listed: Iterable[Obj]) -> list[tuple[str, Obj]]:
    """The events a fresh LIST stands for, given the objects known from before it: each listed one as ADDED or
    MODIFIED, and each known one that is gone, or was replaced by a namesake (another uid), as DELETED."""
    events: list[tuple[str, Obj]] = []
    seen: set[Key] = set()
    for obj in listed:
        key, before = _key(obj), known.get(_key(obj))
        seen.add(key)
        if before is not None and before["metadata"].get("uid") != obj["metadata"].get("uid"):
            events.append(("DELETED", before))
            before = None
        events.append(("ADDED" if before is None else "MODIFIED", obj))
    return [("DELETED", obj) for key, obj in known.items() if key not in seen] + events


class Gone(Exception):
    """The resourceVersion a watch resumes from is too old (410): list again."""


class ListWatch:
    """One kind's objects in one namespace (None: the whole cluster), delivered to ``handler`` in order."""

    def __init__(
        self, kube: Kube, kind: Kind, namespace: str | None, handler: Handler, keep: Callable[[str], bool]
    ) -> None:
        self.kube, self.kind, self.handler, self.keep = kube, kind, handler, keep
        self.path = f"{kind.api}/namespaces/{namespace}/{kind.plural}" if namespace else f"{kind.api}/{kind.plural}"
        self.known: dict[Key, Obj] = {}
        """The metadata of every object delivered and not deleted: what a relist compares with."""
        self.version: str | None = None
        self.stopping = threading.Event()
        self._response: urllib3.BaseHTTPResponse | None = None

    def run(self) -> None:
        """List, then watch from there until stopped; list again whenever no version is known (at the start, after a
        410, from a server that gives none)."""
        backoff = 0.0
        while not self.stopping.is_set():
            try:
                if self.version is None:
                    self._list()
                started = time.monotonic()
                self._watch()
                backoff = 0.0
                if time.monotonic() - started < MIN_WATCH_S:  # a server that ends watches at once: no hot loop
                    self.stopping.wait(MIN_WATCH_S)
            except Gone:
                self.version = None
            except Exception as exc:  # whatever it was, this thread must go on: nothing else watches these objects
                if self.stopping.is_set():
                    return
                backoff = min(max(1.0, backoff * 2), MAX_BACKOFF_S)
                expected = isinstance(exc, (ApiException, urllib3.exceptions.HTTPError, OSError, ValueError))
                log.warning("watching %s failed, again in %.0f s: %s", self.path, backoff, exc, exc_info=not expected)
                self.stopping.wait(backoff)

    def stop(self) -> None:
        """Ends ``run`` soon: at once if it waits on the apiserver's stream, else after the call in progress."""
        self.stopping.set()
        response = self._response
        if response is not None:
            response.shutdown()

    def _list(self) -> None:
        items: list[Obj] = []
        query = [*self._selector(), ("limit", str(LIST_PAGE))]
        accept = METADATA.format("PartialObjectMetadataList") if self.kind.metadata_only else "application/json"
        token: str | None = None
        while True:
            more = [("continue", token)] if token else []
            page = self.kube.request("GET", self.path, query=query + more, accept=accept)
            items.extend(page.get("items") or [])
            token = (page.get("metadata") or {}).get("continue")
            if not token:
                break
        self.version = (page.get("metadata") or {}).get("resourceVersion") or None
        for type, obj in relisted(self.known, (i for i in items if self._wanted(i))):
            self._deliver(type, obj)

    def _watch(self) -> None:
        query = [("watch", "true"), *self._selector(), ("allowWatchBookmarks", "true"),
                 ("timeoutSeconds", str(WATCH_TIMEOUT_S))]  # fmt: skip
        if self.version is not None:
            query.append(("resourceVersion", self.version))
        accept = METADATA.format("PartialObjectMetadata") if self.kind.metadata_only else "application/json"
        self._response = response = self.kube.stream(self.path, query, accept, READ_TIMEOUT_S)
        read_to_the_end = False
        try:
            if self.stopping.is_set():  # stop() came before there was a response to shut down
                return
            for line in response:
                if self.stopping.is_set():
                    return
                if line.strip():
                    self._event(json.loads(line))
            read_to_the_end = True
        finally:
            self._response = None
            if read_to_the_end:
                response.release_conn()
            else:  # a connection left mid-stream must not serve the next request
                response.close()

    def _event(self, event: Obj) -> None:
        type, obj = event.get("type"), event.get("object") or {}
        if type == "ERROR":
            if obj.get("code") == 410:
                raise Gone
            raise ApiException(int(obj.get("code") or 500), str(obj.get("reason") or ""), json.dumps(obj).encode())
        self.version = (obj.get("metadata") or {}).get("resourceVersion") or self.version
        if type != "BOOKMARK" and self._wanted(obj):
            self._deliver(str(type), obj)

    def _selector(self) -> list[tuple[str, str]]:
        return [("labelSelector", OWN_CHILDREN)] if self.kind.children else []

    def _wanted(self, obj: Obj) -> bool:
        """Filtered again here: cheap, and right even where a server ignores the selector (kmock)."""
        meta = obj.get("metadata") or {}
        ours = not self.kind.children or (meta.get("labels") or {}).get(L.MANAGED_BY) == L.MANAGER
        return ours and self.keep(meta.get("namespace") or "")

    def _deliver(self, type: str, obj: Obj) -> None:
        meta = obj["metadata"]
        if type == "DELETED":
            self.known.pop(_key(obj), None)
        else:
            self.known[_key(obj)] = {"metadata": {k: meta.get(k) for k in ("namespace", "name", "uid", "labels")}}
        try:
            self.handler(type, obj)
        except Exception:  # a handler's bug must not end the watch: the next event or resync tries again
            log.exception("handling %s %s %s/%s failed", type, self.kind.plural, meta.get("namespace"), meta["name"])


def _key(obj: Obj) -> Key:
    return obj["metadata"].get("namespace") or "", obj["metadata"]["name"]


class Watches:
    """A ListWatch per kind and scope, each in a daemon thread."""

    def __init__(self, kube: Kube, namespaces: Iterable[str], handlers: dict[Kind, Handler]) -> None:
        where, keep = scopes(namespaces)
        self.watches = [ListWatch(kube, kind, ns, handler, keep) for kind, handler in handlers.items() for ns in where]
        self.threads: list[threading.Thread] = []

    def start(self) -> None:
        for watch in self.watches:
            name = f"kiln-watch-{watch.kind.plural}"
            self.threads.append(threading.Thread(target=watch.run, name=name, daemon=True))
            self.threads[-1].start()

    def stop(self, timeout_s: float = 5.0) -> None:
        for watch in self.watches:
            watch.stop()
        for thread in self.threads:
            thread.join(timeout_s)
