"""The operator's requests: kept-alive connections of the standard library, and urllib3's failure types.

Each test runs over plain HTTP and over TLS: a server that hangs up without TLS's close_notify (as
``http.server`` does, and an apiserver closing an idle connection did in CI) fails the next request with
``ssl.SSLEOFError``, not ``RemoteDisconnected``."""

from __future__ import annotations

import http.server
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import urllib3

from kiln.operator.transport import Connections
from kiln.testing.certs import CertificateAuthority


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, tls: ssl.SSLContext | None) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.client_context: ssl.SSLContext | None = None
        if tls is not None:
            self.socket = tls.wrap_socket(self.socket, server_side=True)
        self.requests: list[tuple[int, str]] = []
        """(client port, path) of each request answered: the port tells the connection."""
        self.hang_up_after = False
        """Close each connection after its answer, without saying so (as a server's idle timeout does later)."""
        self.hang_up_before = False
        """Close each connection without an answer."""
        self.unanswered = 0
        self.hung_up = threading.Event()
        """Set once a connection was closed by the server."""

    def shutdown_request(self, request: object) -> None:
        super().shutdown_request(request)  # type: ignore[arg-type]
        self.hung_up.set()


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Server

    def do_GET(self) -> None:
        if self.server.hang_up_before:
            self.server.unanswered += 1
            self.close_connection = True
            return
        hang_up = self.server.hang_up_after  # read before answering: the test flips it once answered
        self.server.requests.append((self.client_address[1], self.path))
        body = b'{"ok": true}'
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = hang_up

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self.do_GET()

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture(params=["http", "https"])
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Server]:
    tls = client = None
    if request.param == "https":
        authority = CertificateAuthority(tmp_path)
        pair = authority.issue("server", common_name="127.0.0.1", server=True)
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.load_cert_chain(pair.cert, pair.key)
        client = ssl.create_default_context(cafile=authority.pair.cert)
    httpd = Server(tls)
    httpd.client_context = client
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def connections(server: Server, keep: int = 4) -> Connections:
    scheme = "http" if server.client_context is None else "https"
    return Connections(f"{scheme}://127.0.0.1:{server.server_address[1]}", server.client_context, keep=keep)


def test_sequential_requests_reuse_one_connection(server: Server) -> None:
    pool = connections(server)
    answers = [pool.request("GET", f"/{n}?watch=false", None, {}, 5) for n in range(5)]
    assert [(a.status, a.data) for a in answers] == [(200, b'{"ok": true}')] * 5
    assert [path for _, path in server.requests] == [f"/{n}?watch=false" for n in range(5)]
    assert len({port for port, _ in server.requests}) == 1


def test_a_connection_the_server_closed_meanwhile_is_replaced_and_the_request_sent_once(server: Server) -> None:
    pool = connections(server)
    server.hang_up_after = True
    pool.request("GET", "/first", None, {}, 5)
    server.hang_up_after = False
    assert server.hung_up.wait(5)
    # Sent on the closed connection, a body's write fails: over TLS, without close_notify, as an SSLEOFError.
    assert pool.request("POST", "/second", b'{"kind": "Job"}', {"Content-Type": "application/json"}, 5).status == 200
    assert [path for _, path in server.requests] == ["/first", "/second"]
    assert len({port for port, _ in server.requests}) == 2


def test_a_new_connection_lost_before_the_answer_is_urllib3s_protocol_error_and_not_sent_again(server: Server) -> None:
    pool = connections(server)
    server.hang_up_before = True
    with pytest.raises(urllib3.exceptions.ProtocolError, match="/lost"):
        pool.request("GET", "/lost", None, {}, 5)
    assert server.unanswered == 1


def test_nothing_listening_is_urllib3s_max_retry_error() -> None:
    pool = Connections("http://127.0.0.1:1", None, keep=4)  # nothing listens on port 1
    with pytest.raises(urllib3.exceptions.MaxRetryError):
        pool.request("GET", "/", None, {}, 5)


def test_idle_connections_beyond_keep_are_closed(server: Server) -> None:
    pool = connections(server, keep=1)
    first, second = pool._open(5), pool._open(5)
    pool._give(first)
    pool._give(second)
    assert [connection for connection, _ in pool._idle] == [first] and second.sock is None


def test_a_connection_idle_too_long_is_closed_not_reused(server: Server) -> None:
    """The apiserver hangs up after 90 s idle: the pool closes such a connection first, on its side."""
    pool = connections(server)
    pool.idle_s = 0.2
    pool.request("GET", "/first", None, {}, 5)
    [(kept, _)] = pool._idle
    time.sleep(0.3)
    assert pool.request("GET", "/second", None, {}, 5).status == 200
    assert [path for _, path in server.requests] == ["/first", "/second"]
    assert len({port for port, _ in server.requests}) == 2 and kept.sock is None
