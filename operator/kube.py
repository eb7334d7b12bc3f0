"""A small, thread-safe Kubernetes client: plain dicts in and out, over the standard library's keep-alive
connections (``transport``), and urllib3's for the watches' streams.

Not the kubernetes package: its generated models cost 46 MB of memory and, when decoding responses, more CPU
than the rest of a reconcile together, for a dozen REST calls. Creates are idempotent: 409 AlreadyExists adopts
the existing object (deterministic names make that safe after an operator restart).
"""

from __future__ import annotations

import functools
import json
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any, TypeVar

import urllib3
from urllib3.util.ssl_ import create_urllib3_context

from kiln.operator import credentials as creds
from kiln.operator import labels as L
from kiln.operator.conditions import rfc3339
from kiln.operator.transport import Connections, Response

Obj = dict[str, Any]
Resp = TypeVar("Resp", Response, urllib3.BaseHTTPResponse)

MERGE_PATCH = "application/merge-patch+json"
_PATHS = {
    ("v1", "ConfigMap"): "/api/v1/namespaces/{ns}/configmaps",
    ("v1", "Service"): "/api/v1/namespaces/{ns}/services",
    ("v1", "Pod"): "/api/v1/namespaces/{ns}/pods",
    ("v1", "Event"): "/api/v1/namespaces/{ns}/events",
    ("batch/v1", "Job"): "/apis/batch/v1/namespaces/{ns}/jobs",
    (f"{L.TJ_GROUP}/{L.TJ_VERSION}", L.TJ_KIND): f"/apis/{L.TJ_GROUP}/{L.TJ_VERSION}/namespaces/{{ns}}/{L.TJ_PLURAL}",
    (f"{L.TJ_GROUP}/{L.TJ_VERSION}", L.EJ_KIND): f"/apis/{L.TJ_GROUP}/{L.TJ_VERSION}/namespaces/{{ns}}/{L.EJ_PLURAL}",
    (L.KUEUE_API_VERSION, "Workload"): f"/apis/{L.KUEUE_API_VERSION}/namespaces/{{ns}}/workloads",
}


_HOST = socket.gethostname()
"""This replica (its pod's name in a cluster), as its Events name their reporter."""


class ApiException(Exception):
    """A non-2xx answer: ``status`` the HTTP code, ``reason`` its phrase, ``body`` the raw response body."""

    def __init__(self, status: int, reason: str = "", body: bytes | None = None) -> None:
        self.status, self.reason, self.body = status, reason, body
        try:
            message = str(json.loads(body or b"{}").get("message") or "")
        except (ValueError, AttributeError):
            message = ""
        super().__init__(f"({status}) {reason}" + (f": {message}" if message else ""))


class ApiClient:
    """Credentials plus connections per client certificate (an exec plugin may hand out a new one): the requests'
    (``transport``) and the watches' streams (urllib3)."""

    def __init__(self, credentials: creds.Credentials, pool_size: int) -> None:
        self.credentials, self.pool_size = credentials, pool_size
        self._lock = threading.Lock()
        self._pools: tuple[tuple[str | None, str | None], Connections, urllib3.PoolManager] | None = None

    def connections(self, auth: creds.Auth) -> Connections:
        return self._for(auth)[1]

    def pool(self, auth: creds.Auth) -> urllib3.PoolManager:
        return self._for(auth)[2]

    def _for(self, auth: creds.Auth) -> tuple[tuple[str | None, str | None], Connections, urllib3.PoolManager]:
        identity = (auth.cert_path, auth.key_path)
        with self._lock:
            if self._pools is None or self._pools[0] != identity:
                endpoint, context = self.credentials.endpoint, self._tls(auth)
                # No retries= nor block=: urllib3's defaults, which the kubernetes package used as well (three
                # retries, idempotent methods only for read errors; a full pool opens one more connection).
                manager = urllib3.PoolManager(
                    maxsize=self.pool_size,
                    cert_reqs=ssl.CERT_NONE if endpoint.insecure else ssl.CERT_REQUIRED,
                    ssl_context=context,
                )
                if self._pools is not None:
                    self._pools[1].clear()
                    self._pools[2].clear()
                self._pools = (identity, Connections(endpoint.server, context, self.pool_size), manager)
            return self._pools

    def _tls(self, auth: creds.Auth) -> ssl.SSLContext:
        """One TLS context for every connection of the pool. Given the files instead, urllib3 builds a context
        for each connection and loads the CA and the client key into it again: a millisecond and 20 KB each, and
        a burst opens a connection per thread."""
        endpoint = self.credentials.endpoint
        context = create_urllib3_context(cert_reqs=ssl.CERT_NONE if endpoint.insecure else ssl.CERT_REQUIRED)
        if endpoint.ca_path or endpoint.ca_pem:
            context.load_verify_locations(cafile=endpoint.ca_path, cadata=endpoint.ca_pem)
        elif not endpoint.insecure:
            context.load_default_certs()
        if auth.cert_path:
            context.load_cert_chain(auth.cert_path, auth.key_path)
        return context


def load_api_client(pool_size: int, credentials: creds.Credentials | None = None) -> ApiClient:
    """``credentials``, by default in-cluster ones when running in a pod, else the kubeconfig (KUBECONFIG or
    ~/.kube/config)."""
    return ApiClient(credentials or creds.load(), max(pool_size, 4))


def _bearer(auth: creds.Auth) -> dict[str, str]:
    """The Authorization header of a token; none for a client certificate."""
    return {"Authorization": f"Bearer {auth.token}"} if auth.token else {}


def _drained(response: urllib3.BaseHTTPResponse) -> None:
    """Read to its end and back to its pool: a response not wanted after all."""
    response.drain_conn()
    response.release_conn()


def is_status(exc: BaseException, code: int) -> bool:
    return isinstance(exc, ApiException) and exc.status == code


class Kube:
    """The handful of calls the operator makes."""

    def __init__(self, api: ApiClient, timeout_s: float = 30.0, fanout: int = 8) -> None:
        self.api, self.timeout_s = api, timeout_s
        self._fanout = ThreadPoolExecutor(max_workers=fanout, thread_name_prefix="kiln-kube")

    def concurrently(self, first: Callable[[], object], *rest: Callable[[], object]) -> list[object]:
        """Run independent calls at once (one round trip of wall time, not one per call), the first on this very
        thread; re-raise the first error after all have finished, so a retry never races a call still in flight."""
        futures = [self._fanout.submit(call) for call in rest]
        try:
            results: list[object] = [first()]
        except Exception:
            for future in futures:
                future.exception()  # wait for it; its own error, if any, is the lesser news
            raise
        errors = [f.exception() for f in futures]
        for error in errors:
            if error is not None:
                raise error
        return results + [f.result() for f in futures]

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        query: list[tuple[str, str]] | None = None,
        content_type: str = "application/json",
        accept: str = "application/json",
        read: bool = True,
    ) -> Obj:
        """One call; its response decoded, or ``{}`` when the caller does not ``read`` it. Most writes answer with
        the whole object written (a TrainingJob's status PATCH with the TrainingJob, a Job's POST with the Job),
        which the operator learns from its watches anyway: decoding that is CPU and transient memory for nothing."""
        payload = None if body is None else json.dumps(body).encode()
        headers = {"Accept": accept} | ({"Content-Type": content_type} if payload is not None else {})
        target = path + ("?" + urllib.parse.urlencode(query) if query else "")

        def send(auth: creds.Auth) -> Response:
            return self.api.connections(auth).request(method, target, payload, headers | _bearer(auth), self.timeout_s)

        response = self._authorized(send)
        if not 200 <= response.status < 300:
            raise ApiException(status=response.status, reason=response.reason or "", body=response.data)
        return json.loads(response.data) if read and response.data else {}

    def stream(
        self, path: str, query: list[tuple[str, str]], accept: str, read_timeout_s: float
    ) -> urllib3.BaseHTTPResponse:
        """A GET whose body is read as it arrives (a watch): iterate its lines, then ``release_conn()`` it if read to
        the end, else ``close()`` it. Silence for ``read_timeout_s`` ends it with a ReadTimeoutError."""
        url = f"{self.api.credentials.endpoint.server}{path}?{urllib.parse.urlencode(query)}"
        timeout = urllib3.Timeout(connect=self.timeout_s, read=read_timeout_s)

        def send(auth: creds.Auth) -> urllib3.BaseHTTPResponse:
            headers = {"Accept": accept} | _bearer(auth)
            # urllib3's errors (MaxRetryError, ProtocolError, ...) propagate as they are: the watch tries again.
            return self.api.pool(auth).request("GET", url, headers=headers, timeout=timeout, preload_content=False)

        response = self._authorized(send, release=_drained)
        if not 200 <= response.status < 300:
            data = response.read()
            response.release_conn()
            raise ApiException(status=response.status, reason=response.reason or "", body=data)
        return response

    def _authorized(self, send: Callable[[creds.Auth], Resp], release: Callable[[Resp], object] | None = None) -> Resp:
        """``send`` with the current credentials; on a 401 (a rotated or revoked token), fetch anew and send once
        more if they changed."""
        auth = self.api.credentials.auth()
        response = send(auth)
        if response.status == 401:
            self.api.credentials.invalidate()
            if (fresh := self.api.credentials.auth()) != auth:
                if release is not None:
                    release(response)
                response = send(fresh)
        return response

    def _path(self, api_version: str, kind: str, namespace: str, name: str | None = None) -> str:
        base = _PATHS[(api_version, kind)].format(ns=namespace)
        return f"{base}/{name}" if name else base

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> Obj | None:
        try:
            return self.request("GET", self._path(api_version, kind, namespace, name))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def create_or_adopt(self, obj: Obj) -> Obj | None:
        """Create; if it already exists, return the existing one (same deterministic name = same child). None when
        this call created it: what the apiserver answers is ``obj`` as stored, not read (``request``)."""
        meta = obj["metadata"]
        path = self._path(obj["apiVersion"], obj["kind"], meta["namespace"])
        try:
            self.request("POST", path, obj, read=False)
            return None
        except ApiException as exc:
            if exc.status != 409:
                raise
        existing = self.get(obj["apiVersion"], obj["kind"], meta["namespace"], meta["name"])
        if existing is None:  # deleted in between: try once more
            self.request("POST", path, obj, read=False)
        return existing

    def apply_configmap(self, obj: Obj) -> None:
        """Create the ConfigMap, or bring an existing one's data to ``obj``'s."""
        existing = self.create_or_adopt(obj)
        if existing is not None and existing.get("data") != obj["data"]:
            meta = obj["metadata"]
            self.patch("v1", "ConfigMap", meta["namespace"], meta["name"], {"data": obj["data"]})

    def patch(
        self,
        api_version: str,
        kind: str,
        namespace: str,
        name: str,
        patch: Obj,
        *,
        subresource: str = "",
        retry_conflicts: bool = True,
    ) -> None:
        """A merge patch, its answer not read (``request``). ``retry_conflicts`` False: a 409 (a resourceVersion
        precondition in ``patch`` that no longer holds) is raised at once, for the caller to read the object again."""
        path = self._path(api_version, kind, namespace, name) + (f"/{subresource}" if subresource else "")
        send = functools.partial(self.request, "PATCH", path, patch, content_type=MERGE_PATCH, read=False)
        if retry_conflicts:
            self._retry_conflicts(send)
        else:
            send()

    def delete(self, api_version: str, kind: str, namespace: str, name: str, propagation: str = "Background") -> bool:
        body = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": propagation}
        try:
            self.request("DELETE", self._path(api_version, kind, namespace, name), body, read=False)
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return True

    def list_objects(self, api_version: str, kind: str, namespace: str, selector: dict[str, str]) -> list[Obj]:
        query = [("labelSelector", ",".join(f"{k}={v}" for k, v in selector.items()))]
        items = self.request("GET", self._path(api_version, kind, namespace), query=query).get("items", [])
        # Filter again locally: cheap, and correct even against servers that ignore selectors (kmock).
        return [i for i in items if all((i["metadata"].get("labels") or {}).get(k) == v for k, v in selector.items())]

    @staticmethod
    def _retry_conflicts(call: Callable[[], object], attempts: int = 5) -> None:
        for attempt in range(attempts):
            try:
                call()
                return
            except ApiException as exc:
                if exc.status != 409 or attempt == attempts - 1:
                    raise
                time.sleep(0.05 * 2**attempt)
        raise AssertionError("unreachable")

    # Named shortcuts, so callers never spell API versions.
    def get_trainingjob(self, namespace: str, name: str) -> Obj | None:
        return self.get(f"{L.TJ_GROUP}/{L.TJ_VERSION}", L.TJ_KIND, namespace, name)

    def patch_trainingjob_status(
        self, namespace: str, name: str, patch: Obj, *, resource_version: str | None = None
    ) -> None:
        """``resource_version``: write only over that version of the TrainingJob (409 otherwise, not retried), for
        a status computed from a watch event's body instead of a fresh read."""
        body: Obj = {"status": patch}
        if resource_version is not None:
            body["metadata"] = {"resourceVersion": resource_version}
        self.patch(f"{L.TJ_GROUP}/{L.TJ_VERSION}", L.TJ_KIND, namespace, name, body, subresource="status",
                   retry_conflicts=resource_version is None)  # fmt: skip

    def delete_trainingjob(self, namespace: str, name: str) -> bool:
        return self.delete(f"{L.TJ_GROUP}/{L.TJ_VERSION}", L.TJ_KIND, namespace, name)

    def get_job(self, namespace: str, name: str) -> Obj | None:
        return self.get("batch/v1", "Job", namespace, name)

    def delete_job(self, namespace: str, name: str) -> bool:
        return self.delete("batch/v1", "Job", namespace, name)

    def patch_job(self, namespace: str, name: str, patch: Obj) -> None:
        self.patch("batch/v1", "Job", namespace, name, patch)

    def attempt_pods(self, namespace: str, job_name: str, attempt: int) -> list[Obj]:
        return self.list_objects("v1", "Pod", namespace, {L.TRAINING_JOB: job_name, L.ATTEMPT: str(attempt)})

    def job_workload(self, namespace: str, job_uid: str) -> Obj | None:
        """Kueue's Workload for a Job, found by the job-uid label Kueue puts on it. None when there is none yet,
        when Kueue is not installed (404), or when the chart was installed without the Kueue rule (403)."""
        try:
            found = self.list_objects(L.KUEUE_API_VERSION, "Workload", namespace, {L.KUEUE_JOB_UID: job_uid})
        except ApiException as exc:
            if exc.status in (403, 404):
                return None
            raise
        return found[0] if found else None

    def post_event(self, about: Obj, type: str, reason: str, message: str) -> None:
        """A core/v1 Event about ``about`` (a TrainingJob or ExportJob), as ``kubectl describe`` lists them. Posted
        from the thread that decided it, not through kopf's poster on the event loop, which needs kopf's context
        variables and spends the loop's time on every Event."""
        meta, now = about["metadata"], rfc3339(datetime.now(UTC))
        involved = {"apiVersion": about.get("apiVersion"), "kind": about.get("kind"), "name": meta["name"],
                    "namespace": meta["namespace"], "uid": meta.get("uid")}  # fmt: skip
        event = {
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": involved,
            "type": type,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": L.MANAGER, "host": _HOST},  # kubectl describe's "From"
            "reportingComponent": L.MANAGER,
            "reportingInstance": _HOST,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        self.request("POST", self._path("v1", "Event", meta["namespace"]), event, read=False)

    def get_exportjob(self, namespace: str, name: str) -> Obj | None:
        return self.get(f"{L.TJ_GROUP}/{L.TJ_VERSION}", L.EJ_KIND, namespace, name)

    def patch_exportjob_status(self, namespace: str, name: str, patch: Obj) -> None:
        self.patch(f"{L.TJ_GROUP}/{L.TJ_VERSION}", L.EJ_KIND, namespace, name, {"status": patch}, subresource="status")

    def export_pods(self, namespace: str, export_name: str) -> list[Obj]:
        return self.list_objects("v1", "Pod", namespace, {L.EXPORT_JOB: export_name})
