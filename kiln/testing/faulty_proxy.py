"""A fault-injecting HTTP proxy in front of the tests' S3 server: 5xx answers and slow responses, as rules.

The client under test uses the proxy's URL as its ``storage.endpointUrl``; the proxy forwards each request
unchanged (Host header and SigV4 signature included) to the real server, except where a rule applies::

    state_put = Fault(method="PUT", key_pattern=r"state\\.pt$", status=503, times=2)
    with FaultyProxy(s3_server.endpoint_url, [state_put, Delay(method="GET", seconds=0.5)]) as proxy:
        ...  # storage={"endpointUrl": proxy.endpoint_url}
    assert state_put.injected == 2

Forwarding unchanged works because moto does not verify signatures (INITIAL_NO_AUTH_ACTION_COUNT is
unset); a server that did would reject the proxy's Host. Each rule counts what it injected, so a test can
assert its faults really happened instead of passing because no request matched.
"""

from __future__ import annotations

import http.client
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit
from xml.sax.saxutils import escape

# Headers about one connection, not the message: the proxy reads the whole body and sends it with a length.
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "expect",
               "proxy-connection", "proxy-authorization", "content-length"}  # fmt: skip
_S3_CODES = {500: "InternalError", 503: "SlowDown"}  # what S3 itself answers with these statuses


@dataclass(eq=False)
class Rule:
    """Matches a request by method (None: any) and a regex searched in its unquoted path, /bucket/key."""

    method: str | None = None
    key_pattern: str = ""
    times: int = 1
    """How many matching requests the rule applies to; later ones pass through untouched."""
    skip: int = 0
    """How many matching requests pass through untouched before the rule starts to apply."""
    injected: int = field(default=0, init=False)
    skipped: int = field(default=0, init=False)

    def matches(self, method: str, path: str) -> bool:
        return (self.method is None or self.method == method) and re.search(self.key_pattern, path) is not None


@dataclass(eq=False)
class Fault(Rule):
    """Answer with an S3-style error instead of forwarding (the server never sees the request)."""

    status: int = 503


@dataclass(eq=False)
class Delay(Rule):
    """Wait before forwarding: a slow server, not an error."""

    seconds: float = 0.5


class FaultyProxy:
    """A reverse proxy on a free port of 127.0.0.1, served by a thread; a context manager."""

    def __init__(self, upstream: str, rules: list[Rule]) -> None:
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.rules = rules
        self.requests: list[tuple[str, str, int]] = []
        """Every request as (method, path, status answered), for a failing test's message."""
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self.endpoint_url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="faulty-proxy", daemon=True)

    def __enter__(self) -> FaultyProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def claim(self, method: str, path: str) -> list[Rule]:
        """The rules that apply to this request; each one's count goes up as it is claimed."""
        claimed = []
        with self._lock:
            for rule in self.rules:
                if rule.injected >= rule.times or not rule.matches(method, path):
                    continue
                if rule.skipped < rule.skip:
                    rule.skipped += 1
                else:
                    rule.injected += 1
                    claimed.append(rule)
        return claimed

    def record(self, method: str, path: str, status: int) -> None:
        with self._lock:
            self.requests.append((method, path, status))


def _handler_for(proxy: FaultyProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as boto3's connection pool expects; answers 100-continue

        def do_request(self) -> None:
            body = self._read_body()
            path = unquote(urlsplit(self.path).path)
            rules = proxy.claim(self.command, path)
            for delay in (r for r in rules if isinstance(r, Delay)):
                time.sleep(delay.seconds)
            fault = next((r for r in rules if isinstance(r, Fault)), None)
            if fault is not None:
                status, headers, payload = _s3_error(fault.status, path)
            else:
                status, headers, payload = self._forward(body)
            proxy.record(self.command, path, status)
            self.send_response(status)
            for name, value in headers:
                self.send_header(name, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_request

        def _read_body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":  # botocore's checksum trailers
                chunks = []
                while size := int(self.rfile.readline().split(b";")[0], 16):
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()  # the CRLF after each chunk
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # HTTP trailers, if any
                    pass
                return b"".join(chunks)
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _forward(self, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
            upstream = http.client.HTTPConnection(*proxy.upstream, timeout=120)
            try:
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                if body or self.command in ("PUT", "POST"):
                    headers["Content-Length"] = str(len(body))
                upstream.request(self.command, self.path, body=body, headers=headers)
                response = upstream.getresponse()
                payload = response.read()
                kept = [(k, v) for k, v in response.getheaders() if k.lower() not in _HOP_BY_HOP]
                # HEAD keeps the object's length; everything else carries exactly the bytes read.
                length = response.getheader("Content-Length") if self.command == "HEAD" else None
                kept.append(("Content-Length", length or str(len(payload))))
                return response.status, kept, payload
            finally:
                upstream.close()

        def log_message(self, format: str, *args: object) -> None:
            pass  # proxy.requests keeps the record; stderr stays readable

    return Handler


def _s3_error(status: int, path: str) -> tuple[int, list[tuple[str, str]], bytes]:
    code = _S3_CODES.get(status, "ServiceUnavailable")
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>injected by the tests' faulty proxy</Message>"
        f"<Resource>{escape(path)}</Resource><RequestId>{uuid.uuid4().hex}</RequestId></Error>"
    ).encode()
    return status, [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))], body
