"""Pod status patches, as a kubelet would write them (strategic-merge bodies for ``pods/status``)."""

from __future__ import annotations

import datetime
import signal
from dataclasses import dataclass
from typing import Any

from kiln.testing.localpod import LOOPBACK

MAX_TERMINATION_MESSAGE_BYTES = 4096  # the kubelet's limit for the message file
FALLBACK_LOG_LINES = 80  # ...and for FallbackToLogsOnError it takes at most 80 lines
FALLBACK_LOG_BYTES = 2048


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def exit_code(returncode: int) -> int:
    """Popen's -N for "killed by signal N" is the runtime's 128+N (137 for SIGKILL)."""
    return 128 - returncode if returncode < 0 else returncode


@dataclass(frozen=True)
class Terminated:
    exit_code: int
    message: str
    started_at: str
    finished_at: str
    container_id: str

    @property
    def reason(self) -> str:
        if self.exit_code == 0:
            return "Completed"
        return "Error" if self.exit_code < 128 else signal.Signals(self.exit_code - 128).name

    def as_state(self) -> dict[str, Any]:
        return {
            "terminated": {
                "exitCode": self.exit_code,
                "reason": self.reason,
                "message": self.message or None,
                "startedAt": self.started_at,
                "finishedAt": self.finished_at,
                "containerID": self.container_id,
            }
        }


def _conditions(ready: bool, reason: str | None = None) -> list[dict[str, Any]]:
    stamp = now()
    status = "True" if ready else "False"
    return [
        {"type": "PodReadyToStartContainers", "status": "True", "lastTransitionTime": stamp},
        {"type": "Initialized", "status": "True", "lastTransitionTime": stamp},
        {"type": "ContainersReady", "status": status, "reason": reason, "lastTransitionTime": stamp},
        {"type": "Ready", "status": status, "reason": reason, "lastTransitionTime": stamp},
    ]


def _container_status(
    container: dict[str, Any],
    state: dict[str, Any],
    *,
    ready: bool,
    restarts: int,
    container_id: str | None,
    last: Terminated | None,
) -> dict[str, Any]:
    # `null` deletes the other state kinds under strategic merge: a container has exactly one.
    full_state: dict[str, Any] = {"waiting": None, "running": None, "terminated": None, **state}
    return {
        "name": container["name"],
        "image": container.get("image", ""),
        "imageID": "",
        "containerID": container_id,
        "ready": ready,
        "started": "running" in state,
        "restartCount": restarts,
        "state": full_state,
        "lastState": last.as_state() if last else {},
    }


def running(
    pod: dict[str, Any], *, started_at: str, container_id: str, restarts: int, last: Terminated | None
) -> dict[str, Any]:
    container = pod["spec"]["containers"][0]
    return {
        "status": {
            "phase": "Running",
            "hostIP": LOOPBACK,
            "hostIPs": [{"ip": LOOPBACK}],
            "podIP": LOOPBACK,
            "podIPs": [{"ip": LOOPBACK}],
            "startTime": pod.get("status", {}).get("startTime") or started_at,
            "conditions": _conditions(ready=True),
            "containerStatuses": [
                _container_status(
                    container,
                    {"running": {"startedAt": started_at}},
                    ready=True,
                    restarts=restarts,
                    container_id=container_id,
                    last=last,
                )
            ],
        }
    }


def terminated(pod: dict[str, Any], result: Terminated, *, restarts: int) -> dict[str, Any]:
    container = pod["spec"]["containers"][0]
    return {
        "status": {
            "phase": "Succeeded" if result.exit_code == 0 else "Failed",
            "conditions": _conditions(ready=False, reason="PodCompleted"),
            "containerStatuses": [
                _container_status(
                    container,
                    result.as_state(),
                    ready=False,
                    restarts=restarts,
                    container_id=result.container_id,
                    last=None,
                )
            ],
        }
    }


def waiting(pod: dict[str, Any], reason: str, message: str) -> dict[str, Any]:
    container = pod["spec"]["containers"][0]
    return {
        "status": {
            "hostIP": LOOPBACK,
            "hostIPs": [{"ip": LOOPBACK}],
            "conditions": _conditions(ready=False, reason="ContainersNotReady"),
            "containerStatuses": [
                _container_status(
                    container,
                    {"waiting": {"reason": reason, "message": message}},
                    ready=False,
                    restarts=0,
                    container_id=None,
                    last=None,
                )
            ],
        }
    }


def failed_to_start(pod: dict[str, Any], reason: str, message: str) -> dict[str, Any]:
    """A pod the executor cannot run at all ends Failed, like a kubelet rejecting it at admission."""
    return {"status": {"phase": "Failed", "reason": reason, "message": message}}


def termination_message(message_file: bytes, log_tail: bytes, *, policy: str, failed: bool) -> str:
    """The file's content; with ``FallbackToLogsOnError``, the log tail if the file is empty and it failed."""
    message = message_file[:MAX_TERMINATION_MESSAGE_BYTES]
    if not message.strip() and failed and policy == "FallbackToLogsOnError":
        lines = log_tail.splitlines()[-FALLBACK_LOG_LINES:]
        message = b"\n".join(lines)[-FALLBACK_LOG_BYTES:]
    return message.decode(errors="replace")
