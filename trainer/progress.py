"""Progress reporting: what the operator and ``kiln run`` see of a running job.

A ``ProgressReporter`` receives a ``Snapshot`` whenever something changes. The default does nothing; rank 0
serves the latest snapshot as JSON on ``GET /progress`` (see ``observability.StatusServer``), which the
operator polls into ``TrainingJob.status``. At exit the final snapshot (or the failure) goes to the
Kubernetes termination log, so the operator can read the outcome from the pod status.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Protocol

from kiln.api.status import CheckpointStatus, Progress

log = logging.getLogger(__name__)

State = Literal["running", "completed", "preempted", "failed"]
# Kubernetes truncates termination messages at 4096 bytes; stay under it.
TERMINATION_MESSAGE_LIMIT = 4000


@dataclass
class Snapshot:
    state: State = "running"
    progress: Progress = field(default_factory=Progress)
    checkpoints: CheckpointStatus = field(default_factory=CheckpointStatus)
    stop_reason: str | None = None  # why a completed run ended before its last epoch (early stopping)

    def to_dict(self) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "state": self.state,
            "progress": self.progress.to_dict(),
            "checkpoints": self.checkpoints.to_dict(),
        }
        if self.stop_reason:
            payload["stopReason"] = self.stop_reason
        return payload


class ProgressReporter(Protocol):
    def report(self, snapshot: Snapshot) -> None: ...

    def close(self) -> None: ...


class NullReporter:
    """The default: progress goes nowhere."""

    def report(self, snapshot: Snapshot) -> None:
        pass

    def close(self) -> None:
        pass


class LatestSnapshot:
    """Keeps the latest snapshot for the HTTP server to serve; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._payload: dict[str, Any] = Snapshot().to_dict()

    def report(self, snapshot: Snapshot) -> None:
        payload = snapshot.to_dict()
        with self._lock:
            self._payload = payload

    def json_bytes(self) -> bytes:
        with self._lock:
            return json.dumps(self._payload).encode()

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


def termination_message(snapshot: Snapshot) -> str:
    """Compact JSON under the 4 KB limit: metrics are dropped, least important last, until it fits."""
    payload = snapshot.to_dict()
    metrics: dict[str, float] = payload["progress"].get("metrics", {})
    keep = sorted(metrics, key=lambda name: (not name.startswith("val/"), name))
    while True:
        payload["progress"]["metrics"] = {name: metrics[name] for name in keep}
        text = json.dumps(payload, separators=(",", ":"))
        if len(text.encode()) <= TERMINATION_MESSAGE_LIMIT or not keep:
            return text
        keep.pop()


def failure_message(reason: str, exit_code: int) -> str:
    reason = " ".join(reason.split())[:3000]
    return json.dumps({"state": "failed", "reason": reason, "exitCode": exit_code}, separators=(",", ":"))


def write_termination_log(path: str, text: str, *, first_failure_wins: bool = False) -> None:
    """Best effort: a missing or read-only termination log (laptops, tests) is skipped silently.

    Every rank of a pod shares one termination log. With ``first_failure_wins`` a failure already recorded
    is kept: the rank that failed first holds the cause, the others only saw their peer disappear.
    """
    target = Path(path)
    try:
        if first_failure_wins and _records_failure(target):
            return
        target.write_text(text)
    except OSError as exc:
        log.debug("termination log %s not written: %s", path, exc)


def _records_failure(path: Path) -> bool:
    try:
        return json.loads(path.read_text()).get("state") == "failed"
    except (OSError, ValueError, AttributeError):
        return False
