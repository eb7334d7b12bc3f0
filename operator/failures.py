"""Why an attempt ended, read from its pods: pure functions over pod and Job dicts.

Retriable (the whole gang is replaced, up to runPolicy.maxRestarts):
  - a container killed by a signal: exit code >= 128 (137 = SIGKILL/OOM, 143 = SIGTERM);
  - an exit code listed in runPolicy.retriableExitCodes;
  - a disruption: the pod has condition DisruptionTarget (preemption, eviction, node drain, taint eviction),
    was evicted, or its node was lost;
  - rank 0 reported state "preempted" (it checkpointed on SIGTERM and exited 0).
Everything else is final: exit 2 (invalid input) and 1 (a bug, bad data) never heal by retrying.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from kiln.operator import labels as L

Obj = dict[str, Any]

MESSAGE_LIMIT = 4000
_EXIT_CODE_IN_MESSAGE = re.compile(r"exit code (\d+)")
_DISRUPTION_REASONS = frozenset({"Evicted", "NodeLost", "Preempting", "Shutdown", "Terminated", "NodeShutdown"})


@dataclass(frozen=True)
class Report:
    """What rank 0 said last: the JSON of /progress or of its termination message, or raw text."""

    state: str | None = None
    progress: Obj | None = None
    checkpoints: Obj | None = None
    reason: str | None = None
    raw: str | None = None

    @property
    def text(self) -> str:
        return self.reason or self.raw or ""


def parse_report(text: str | None) -> Report:
    """Parse a termination message or /progress body; anything that is not the JSON shape is kept as text."""
    if not text or not text.strip():
        return Report()
    try:
        data = json.loads(text)
    except ValueError:
        return Report(raw=text.strip()[:MESSAGE_LIMIT])
    if not isinstance(data, dict):
        return Report(raw=text.strip()[:MESSAGE_LIMIT])
    progress, checkpoints = data.get("progress"), data.get("checkpoints")
    reason = data.get("reason")
    return Report(
        state=data.get("state") if isinstance(data.get("state"), str) else None,
        progress=progress if isinstance(progress, dict) else None,
        checkpoints=checkpoints if isinstance(checkpoints, dict) else None,
        reason=str(reason)[:MESSAGE_LIMIT] if reason else None,
    )


@dataclass(frozen=True)
class PodOutcome:
    """One worker pod's end, reduced to what the retry decision needs."""

    name: str
    index: int
    exit_code: int | None = None
    message: str = ""
    disrupted: bool = False
    finished_at: str = ""
    pod_reason: str = ""


def _terminated(pod: Obj) -> Obj:
    for status in pod.get("status", {}).get("containerStatuses") or []:
        if status.get("name") == L.CONTAINER_NAME:
            return (
                (status.get("state") or {}).get("terminated") or (status.get("lastState") or {}).get("terminated") or {}
            )
    return {}


def pod_outcome(pod: Obj) -> PodOutcome:
    meta, status = pod.get("metadata", {}), pod.get("status", {})
    index = (meta.get("annotations") or {}).get(L.COMPLETION_INDEX_ANNOTATION) or (meta.get("labels") or {}).get(
        L.COMPLETION_INDEX_LABEL, "0"
    )
    terminated = _terminated(pod)
    disrupted = (
        any(c.get("type") == "DisruptionTarget" and c.get("status") == "True" for c in status.get("conditions") or [])
        or status.get("reason") in _DISRUPTION_REASONS
    )
    return PodOutcome(
        name=meta.get("name", ""),
        index=int(index) if str(index).isdigit() else 0,
        exit_code=terminated.get("exitCode"),
        message=(terminated.get("message") or "").strip(),
        disrupted=disrupted,
        finished_at=terminated.get("finishedAt") or "",
        pod_reason=status.get("reason") or terminated.get("reason") or "",
    )


def rank0_report(pods: Iterable[Obj]) -> Report:
    """Rank 0's termination message, parsed."""
    for outcome in map(pod_outcome, pods):
        if outcome.index == 0 and outcome.message:
            return parse_report(outcome.message)
    return Report()


@dataclass(frozen=True)
class Failure:
    retriable: bool
    message: str
    exit_code: int | None = None
    pods: tuple[str, ...] = field(default_factory=tuple)


def is_retriable_exit(code: int, retriable_exit_codes: Iterable[int]) -> bool:
    return code >= 128 or code in set(retriable_exit_codes)


def _describe(outcome: PodOutcome) -> str:
    if outcome.exit_code is None:
        what = f"pod {outcome.name} was disrupted ({outcome.pod_reason or 'DisruptionTarget'})"
    else:
        what = f"pod {outcome.name} (rank {outcome.index}) exited with code {outcome.exit_code}"
        if (reported := effective_exit_code(outcome)) != outcome.exit_code:
            what += f" (the trainer's exit code: {reported})"
    text = parse_report(outcome.message).text if outcome.message else ""
    return f"{what}: {text}" if text else what


def classify(pods: Iterable[Obj], job: Obj, retriable_exit_codes: Iterable[int]) -> Failure:
    """Decide whether a failed attempt is worth a whole-gang restart, naming the pod that caused it.

    A disrupted pod makes the attempt retriable whatever its peers did afterwards (a lost node shows up
    late, after the survivors' rendezvous errors). Otherwise the earliest failure is the cause: peers that
    lose a rank fail after it; on a tie the non-retriable one wins, so an invalid input is never retried.
    """
    codes = tuple(retriable_exit_codes)
    failed = [o for o in map(pod_outcome, pods) if o.disrupted or (o.exit_code not in (None, 0))]
    if not failed:
        # Pods already gone (deleted, garbage-collected): fall back to the Job's own account.
        message = _job_failure_message(job)
        match = _EXIT_CODE_IN_MESSAGE.search(message)
        code = int(match.group(1)) if match else None
        retriable = code is None or is_retriable_exit(code, codes)
        return Failure(retriable=retriable, message=message or "the attempt failed", exit_code=code)
    names = tuple(o.name for o in failed)
    disrupted = [o for o in failed if o.disrupted]
    if disrupted:
        return Failure(retriable=True, message=_describe(disrupted[0])[:MESSAGE_LIMIT], pods=names)

    def healable(outcome: PodOutcome) -> bool:
        return is_retriable_exit(effective_exit_code(outcome), codes)

    cause = min(failed, key=lambda o: (o.finished_at or "~", healable(o), o.index))
    return Failure(
        retriable=healable(cause),
        message=_describe(cause)[:MESSAGE_LIMIT],
        exit_code=effective_exit_code(cause),
        pods=names,
    )


def effective_exit_code(outcome: PodOutcome) -> int:
    """The trainer's own exit code when its termination message carries one (torchrun turns every child
    failure into 1), else the container's."""
    try:
        reported = json.loads(outcome.message).get("exitCode") if outcome.message.startswith("{") else None
    except (ValueError, AttributeError):
        reported = None
    if isinstance(reported, int) and reported > 0 and (outcome.exit_code or 0) < 128:
        return reported
    return outcome.exit_code or 0


def _job_failure_message(job: Obj) -> str:
    for condition in job.get("status", {}).get("conditions") or []:
        if condition.get("type") == "Failed" and condition.get("status") == "True":
            return f"{condition.get('reason', '')}: {condition.get('message', '')}".strip(": ")
    return ""
