"""A real ``mlflow server`` on 127.0.0.1 for the tracking tests: a SQLite store and proxied artifacts under a
temporary folder, plus whatever a test adds (``--app-name basic-auth`` and its config)."""

from __future__ import annotations

import contextlib
import os
import sys
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from kiln.testing.processes import free_port, spawn_in_new_group, stop_group, wait_until

MLFLOW = Path(sys.executable).parent / "mlflow"
START_SECONDS = 240  # the server imports most of MLflow (and migrates its stores) before it listens


@contextlib.contextmanager
def mlflow_server(root: Path, *extra_args: str, env: Mapping[str, str] | None = None) -> Iterator[str]:
    """Run ``mlflow server`` with ``extra_args`` and ``env`` added until the block ends; yields its URI. Its
    output goes to ``root``/server.log, whose tail a failed start shows."""
    port = free_port()
    command = [
        str(MLFLOW), "server", "--backend-store-uri", f"sqlite:///{root}/mlflow.db", "--host", "127.0.0.1",
        "--port", str(port), "--workers", "1", "--artifacts-destination", str(root / "artifacts"), *extra_args,
    ]  # fmt: skip
    # The server's background job runner (GenAI jobs) is not needed here and would cost a few processes.
    server_env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **(env or {})}
    log_path = root / "server.log"
    uri = f"http://127.0.0.1:{port}"
    with log_path.open("wb") as log:
        server = spawn_in_new_group(command, log=log, env=server_env)
        try:

            def still_running() -> None:
                if server.poll() is not None:
                    raise RuntimeError(f"exited with code {server.returncode}")

            try:
                wait_until(lambda: _healthy(uri), timeout=START_SECONDS, what="mlflow server", interval=0.5,
                           on_tick=still_running)  # fmt: skip
            except (RuntimeError, TimeoutError) as error:
                pytest.fail(f"mlflow server did not start ({error}): {log_path.read_text(errors='replace')[-2000:]}")
            yield uri
        finally:
            stop_group(server)  # SIGTERM, then SIGKILL: nothing on a test server needs a clean shutdown


def _healthy(uri: str) -> bool:
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:  # /health needs no login
            return response.status == 200
    except OSError:
        return False
