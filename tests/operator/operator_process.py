"""`kiln operator` as a child process of the tests, restartable (the restart tests kill it mid-flight)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from kiln.operator.settings import ENV_PREFIX, Settings
from kiln.testing.processes import free_port, wait_until

REPO = Path(__file__).resolve().parents[2]


def shipped_lease_timings() -> dict[str, str]:
    """The environment that gives an operator the shipped lease timings (Settings' defaults), overriding the
    long ones every test operator gets otherwise."""
    shipped = Settings()
    names = ("lease_duration_s", "renew_deadline_s", "retry_period_s")
    return {f"{ENV_PREFIX}{name.upper()}": str(getattr(shipped, name)) for name in names}


class OperatorProcess:
    """`kiln operator` as a child process, restartable (the restart tests kill it mid-flight)."""

    def __init__(self, kubeconfig: Path, log_path: Path, **settings: str) -> None:
        self.kubeconfig, self.log_path = kubeconfig, log_path
        self.metrics_port = free_port()
        self.settings = settings
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> OperatorProcess:
        env = {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "KILN_OPERATOR_METRICS_PORT": str(self.metrics_port),
            "KILN_OPERATOR_PROGRESS_INTERVAL_S": "1",
            "KILN_OPERATOR_IMAGE": "kiln/trainer:test",
            # A Lease that survives the seconds-long apiserver stalls of a machine shared by several test runs
            # without pausing the operator (past the renew deadline its lease process SIGSTOPs it until a renewal
            # succeeds), so that the other tests' timeouts never include a pause. The tests of the takeover and
            # of an apiserver restart pass the shipped timings (shipped_lease_timings).
            "KILN_OPERATOR_LEASE_DURATION_S": "120",
            "KILN_OPERATOR_RENEW_DEADLINE_S": "90",
            "KILN_OPERATOR_RETRY_PERIOD_S": "2",
            **self.settings,
        }
        log = self.log_path.open("ab")
        self.process = subprocess.Popen([sys.executable, "-m", "kiln.cli", "operator"], env=env, stdout=log,
                                        stderr=subprocess.STDOUT, cwd=REPO)  # fmt: skip
        # Start-up imports kopf, the kubernetes client and kiln.api twice (the operator and its lease process):
        # about 4 CPU-seconds, which took over 30 s of wall time on a machine shared by several test runs.
        wait_until(self.ready, timeout=60, what="operator /readyz", on_tick=self.check_alive)
        return self

    def check_alive(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"operator exited {self.process.returncode}:\n{self.log()[-3000:]}")

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/readyz", timeout=1) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as response:
            return str(response.read().decode())

    def stop(self, kill: bool = False) -> None:
        if self.process is None:
            return
        if kill:
            self.process.kill()
        else:
            self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None
        time.sleep(0.2)

    @contextlib.contextmanager
    def stepped_aside(self) -> Iterator[None]:
        """Stopped for the duration of the block, then started again: a clean stop releases the Lease, so another
        operator acquires it at once, and nothing else reconciles meanwhile."""
        self.stop()
        try:
            yield
        finally:
            self.start()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
