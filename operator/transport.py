"""The operator's requests to the apiserver: HTTP/1.1 keep-alive connections of the standard library.

urllib3's PoolManager costs more CPU per request than ``http.client`` on the same TLS connection (a GET of a
TrainingJob 293 against 199 us, a status PATCH 510 against 299 us: bench/apiserver_request_cost.py): on every
request it parses the URL and looks its pool up, copies header dicts, builds a Retry and a Timeout, polls the socket
for a dropped connection and wraps the response with its decoders. The operator sends about ten requests per
TrainingJob, all on the one core the GIL lends it: this cut its CPU by a quarter to a third in
bench/operator_vs_kubeflow.py (docs/benchmarks.md). Watches, which stream, stay on urllib3 (``Kube.stream``).

Failures keep urllib3's types, which the callers catch (the lease loop, the Event poster, the watches): a connection
that cannot be opened raises ``MaxRetryError``, one lost mid-request ``ProtocolError``. Unlike urllib3's default
Retry, a refused connection is not tried again at once: the callers' own retries (the work queue's resync, the lease
loop's next round) wait first.
"""

from __future__ import annotations

import http.client
import ssl
import threading
import time
import urllib.parse
from typing import NamedTuple

import urllib3


class Response(NamedTuple):
    status: int
    reason: str
    data: bytes


STALE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError, ConnectionAbortedError, ssl.SSLEOFError)
"""How a kept-alive connection that the server closed meanwhile fails: the request goes again on a new one, as
urllib3, requests and Go's net/http do. Nothing was answered; and should the server have acted on it before it
hung up, every write of the operator's is safe to send twice (a create adopts on 409, a patch merges or carries
its resourceVersion, an Event is only told twice)."""


IDLE_S = 60.0
"""Seconds a connection may wait idle before it is closed instead of reused: below the kube-apiserver's own
IdleTimeout of 90 s (k8s.io/apiserver secure_serving.go), after which it hangs up. A request sent on a connection
it closed fails, and is sent again on a new one (``STALE``); one closed here first needs no failure."""


class Connections:
    """Kept-alive connections to one server, the most recently used first; at most ``keep`` idle ones are kept, and
    a request finding none idle opens one more (urllib3's non-blocking pool did the same)."""

    def __init__(self, server: str, context: ssl.SSLContext | None, keep: int, idle_s: float = IDLE_S) -> None:
        url = urllib.parse.urlsplit(server)
        self.https = url.scheme == "https"
        self.host, self.port = url.hostname or "localhost", url.port or (443 if self.https else 80)
        self.base = url.path.rstrip("/")
        self.context, self.keep, self.idle_s = context, keep, idle_s
        self._idle: list[tuple[http.client.HTTPConnection, float]] = []
        """(connection, when it was given back) on the monotonic clock, the most recently used last."""
        self._lock = threading.Lock()

    def request(
        self, method: str, path: str, body: bytes | None, headers: dict[str, str], timeout_s: float
    ) -> Response:
        """One request and its whole response; ``path`` includes the query."""
        target, reuse = self.base + path, True
        while True:
            connection, reused = self._take(timeout_s, reuse)
            try:
                connection.request(method, target, body=body, headers=headers)
                response = connection.getresponse()
                data = response.read()
            except STALE as exc:
                connection.close()
                if reused:  # the other idle ones are likely closed too (a restart): once more, on a new one
                    self.clear()
                    reuse = False
                    continue
                raise urllib3.exceptions.ProtocolError(f"{method} {path}: {exc!r}") from exc
            except (OSError, http.client.HTTPException) as exc:  # a timeout, a broken response
                connection.close()
                raise urllib3.exceptions.ProtocolError(f"{method} {path}: {exc!r}") from exc
            except BaseException:
                connection.close()
                raise
            if response.will_close:
                connection.close()
            else:
                self._give(connection)
            return Response(response.status, response.reason, data)

    def clear(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for connection, _ in idle:
            connection.close()

    def _take(self, timeout_s: float, reuse: bool) -> tuple[http.client.HTTPConnection, bool]:
        with self._lock:
            oldest_kept = time.monotonic() - self.idle_s
            expired = 0
            while expired < len(self._idle) and self._idle[expired][1] < oldest_kept:
                expired += 1
            stale, self._idle[:expired] = self._idle[:expired], []
            connection = self._idle.pop()[0] if self._idle and reuse else None
        for old, _ in stale:
            old.close()
        if connection is None:
            return self._open(timeout_s), False
        if connection.sock is not None:
            connection.sock.settimeout(timeout_s)
        return connection, True

    def _open(self, timeout_s: float) -> http.client.HTTPConnection:
        if self.https:
            connection: http.client.HTTPConnection = http.client.HTTPSConnection(
                self.host, self.port, timeout=timeout_s, context=self.context
            )
        else:
            connection = http.client.HTTPConnection(self.host, self.port, timeout=timeout_s)
        try:
            connection.connect()
        except OSError as exc:  # refused, unreachable, a failed TLS handshake
            connection.close()
            raise urllib3.exceptions.MaxRetryError(None, self.host, exc) from exc  # type: ignore[arg-type]
        return connection

    def _give(self, connection: http.client.HTTPConnection) -> None:
        with self._lock:
            if len(self._idle) < self.keep:
                self._idle.append((connection, time.monotonic()))
                return
        connection.close()
