"""Child processes that can never outlive the harness that started them.

Every child runs in its own session (so one ``killpg`` reaches everything it forks) and, on
Linux, asks the kernel to SIGKILL it if the harness dies without cleaning up. Stopping is
SIGTERM to the group, a grace period, then SIGKILL.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

_PR_SET_PDEATHSIG = 1


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def port_is_free(port: int) -> bool:
    """Whether a server could listen on ``port`` on every address now, as torch's TCPStore and the metrics
    server do (SO_REUSEADDR, so a socket in TIME_WAIT does not count as taken)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def _death_signal_setter(signum: int) -> Callable[[], None]:
    parent = os.getpid()

    def die_with_parent() -> None:
        """Runs in the child between fork and exec: the kernel sends ``signum`` when the parent exits."""
        if sys.platform.startswith("linux"):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signum)
            if os.getppid() != parent:  # the parent died before prctl took effect
                os._exit(1)

    return die_with_parent


def spawn_in_new_group(
    argv: Sequence[str],
    *,
    log: IO[bytes],
    env: dict[str, str] | None = None,
    cwd: str | Path | None = None,
    death_signal: int = signal.SIGKILL,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` as the leader of a new process group, stdout and stderr into ``log``.

    ``death_signal`` reaches the child if this process dies first. SIGKILL suits a leaf process;
    a process with children of its own (the executor) gets SIGTERM, so that it can kill them.
    """
    return subprocess.Popen(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=cwd,
        start_new_session=True,
        preexec_fn=_death_signal_setter(death_signal),  # noqa: PLW1509 - spawned from one thread
    )


def signal_group(process: subprocess.Popen[bytes], signum: int) -> None:
    """Signal the whole process group led by ``process``; a group that is gone already is fine."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signum)


def stop_group(process: subprocess.Popen[bytes], grace_seconds: float = 5.0) -> int:
    """SIGTERM the group, wait up to ``grace_seconds``, then SIGKILL it. Returns the exit code."""
    if process.poll() is None:
        signal_group(process, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=grace_seconds)
    # The leader may be gone while children it forked still hold the group: kill them too.
    signal_group(process, signal.SIGKILL)
    return process.wait()


class ManagedProcess:
    """A named control-plane component: its process, its log file, and how to stop it."""

    def __init__(self, name: str, argv: Sequence[str], log_dir: Path, *, death_signal: int = signal.SIGKILL):
        self.name = name
        self.argv = list(argv)
        self.log_path = log_dir / f"{name}.log"
        self._log = self.log_path.open("ab")
        self.process = spawn_in_new_group(self.argv, log=self._log, death_signal=death_signal)

    def check_alive(self) -> None:
        """Raise with the tail of the log if the component already exited."""
        code = self.process.poll()
        if code is not None:
            raise RuntimeError(f"{self.name} exited with code {code}; last log lines:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return "(no log)"

    def stop(self, grace_seconds: float = 5.0) -> None:
        stop_group(self.process, grace_seconds)
        self._log.close()


def wait_until(
    condition: Callable[[], bool],
    *,
    timeout: float,
    what: str,
    interval: float = 0.1,
    on_tick: Callable[[], None] | None = None,
) -> None:
    """Poll ``condition`` until it is true; ``on_tick`` may raise to abort early (a crashed child)."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if on_tick is not None:
            on_tick()
        try:
            if condition():
                return
        except Exception as error:  # "not ready yet" comes in many shapes
            last_error = error
        time.sleep(interval)
    detail = f" (last error: {last_error})" if last_error else ""
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}{detail}")
