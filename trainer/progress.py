"""Progress reporting: what the operator and ``kiln run`` see of a running job.

A ``ProgressReporter`` receives a ``TrainerReport`` (kiln.api.contract) whenever something changes. The
default does nothing; rank 0 serves the latest report as JSON on ``GET /progress`` (see
``observability.StatusServer``), which the operator polls into ``TrainingJob.status``. At exit the final
report (or the failure) goes to the Kubernetes termination log, so the operator and ``kiln run`` read the
outcome with the same model.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from kiln.api.contract import TrainerReport, parse_report

log = logging.getLogger(__name__)


class ProgressReporter(Protocol):
    def report(self, snapshot: TrainerReport) -> None: ...

    def close(self) -> None: ...


class NullReporter:
    """The default: progress goes nowhere."""

    def report(self, snapshot: TrainerReport) -> None:
        pass

    def close(self) -> None:
        pass


class LatestSnapshot:
    """Keeps the latest snapshot for the HTTP server to serve; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._payload = TrainerReport().to_json().encode()

    def report(self, snapshot: TrainerReport) -> None:
        payload = snapshot.to_json().encode()
        with self._lock:
            self._payload = payload

    def json_bytes(self) -> bytes:
        with self._lock:
            return self._payload

    def close(self) -> None:
        pass


class EtaClock:
    """Step rate over the steps done in this process (restarts do not skew it)."""

    def __init__(self, start_step: int) -> None:
        self._start_step = start_step
        self._start = time.monotonic()

    def eta_seconds(self, step: int, total_steps: int) -> float | None:
        done = step - self._start_step
        if done <= 0:
            return None
        rate = done / max(time.monotonic() - self._start, 1e-9)
        return round(max(total_steps - step, 0) / rate, 1)


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def write_termination_log(path: str, text: str) -> None:
    """Best effort: a missing or read-only termination log (laptops, tests) is skipped silently.

    Every rank of a pod shares one termination log, and a failure already recorded there is kept: the rank
    that failed first holds the cause; the others only saw their peer disappear, and rank 0's "preempted"
    after a peer's failure must not hide it.
    """
    target = Path(path)
    try:
        if _records_failure(target):
            return
        target.write_text(text)
    except OSError as exc:
        log.debug("termination log %s not written: %s", path, exc)


def _records_failure(path: Path) -> bool:
    try:
        report = parse_report(path.read_text())
    except OSError:
        return False
    return report is not None and report.state == "failed"
