"""The kubelet's container-log endpoint, for the local executor's node: what makes ``kubectl logs`` work there.

kube-apiserver serves ``pods/log`` by proxying to the kubelet of the pod's node, at the node's address and
``status.daemonEndpoints.kubeletEndpoint.Port``: ``GET /containerLogs/<namespace>/<pod>/<container>`` with
``follow``, ``tailLines`` and ``limitBytes``. The test control plane's apiserver has no
``--kubelet-certificate-authority``, so it does not verify the kubelet's serving certificate; one from a throwaway
CA will do. The executor writes a container's output straight to a file, so there are no per-line times:
``timestamps=true`` adds none, and ``sinceSeconds``/``sinceTime`` are not honoured.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from kiln.testing import executor_layout
from kiln.testing.certs import CertificateAuthority

logger = logging.getLogger("kiln.testing.kubelet_logs")
FOLLOW_POLL_SECONDS = 0.2

# (namespace, pod) -> whether its container may still write (a follow ends once it may not and all is sent)
IsRunning = Callable[[str, str], bool]


def tail_lines(data: bytes, lines: int) -> bytes:
    if lines <= 0:
        return b""
    parts = data.splitlines(keepends=True)
    return b"".join(parts[-lines:])


class KubeletLogServer:
    """HTTPS on 127.0.0.1 (any free port): ``/containerLogs/...`` from the executor's pod log files."""

    def __init__(self, root: Path, is_running: IsRunning, node_name: str) -> None:
        pki = CertificateAuthority(root / "kubelet-pki").issue("kubelet", common_name=node_name, server=True)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(pki.cert, pki.key)

        class Handler(BaseHTTPRequestHandler):
            # HTTP/1.0: the body ends when the connection closes, which is what a followed log needs.
            def do_GET(self) -> None:
                url = urlsplit(self.path)
                parts = url.path.strip("/").split("/")
                if len(parts) != 4 or parts[0] != "containerLogs":
                    self.send_error(404, "only /containerLogs/<namespace>/<pod>/<container>")
                    return
                _, namespace, pod, container = parts
                query = {key: values[-1] for key, values in parse_qs(url.query).items()}
                path = executor_layout.log_path(root, namespace, pod, container)
                if not path.exists():
                    self.send_error(404, f"no log for {namespace}/{pod}/{container} on this node")
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.end_headers()
                # The client may go away mid-stream (kubectl logs -f interrupted).
                with contextlib.suppress(BrokenPipeError, ConnectionResetError, ssl.SSLError):
                    self._send(path, query, lambda: is_running(namespace, pod))

            def _send(self, path: Path, query: dict[str, str], running: Callable[[], bool]) -> None:
                data = path.read_bytes()
                offset = len(data)
                if "tailLines" in query:
                    data = tail_lines(data, int(query["tailLines"]))
                if "limitBytes" in query:
                    data = data[: int(query["limitBytes"])]
                self.wfile.write(data)
                self.wfile.flush()
                if query.get("follow") != "true":
                    return
                while True:
                    alive = running()  # read before the file: what it wrote before exiting is still sent
                    with path.open("rb") as log:
                        log.seek(offset)
                        more = log.read()
                    if more:
                        offset += len(more)
                        self.wfile.write(more)
                        self.wfile.flush()
                    elif not alive:
                        return
                    else:
                        time.sleep(FOLLOW_POLL_SECONDS)

            def log_message(self, format: str, *args: Any) -> None:
                logger.debug("kubelet log request: " + format, *args)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="kubelet-logs", daemon=True)

    def start(self) -> KubeletLogServer:
        self._thread.start()
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
