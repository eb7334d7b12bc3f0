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

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from kiln.api import contract
from kiln.api.contract import ExitCode, TrainerReport, is_retriable_exit, parse_report
from kiln.operator import labels as L

Obj = dict[str, Any]

MESSAGE_LIMIT = 4000
_EXIT_CODE_IN_MESSAGE = re.compile(r"exit code (\d+)")
_DISRUPTION_REASONS = frozenset({"Evicted", "NodeLost", "Preempting", "Shutdown", "Terminated", "NodeShutdown"})


def message_text(message: str) -> str:
    """What a termination message says: the report's reason, or the raw text (a log tail) when it is none."""
    report = parse_report(message)
    if report is not None:
        return (report.reason or "")[:MESSAGE_LIMIT]
    return message.strip()[:MESSAGE_LIMIT]


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


def _terminated(pod: Obj, container: str) -> Obj:
    for status in pod.get("status", {}).get("containerStatuses") or []:
        if status.get("name") == container:
            return (
                (status.get("state") or {}).get("terminated") or (status.get("lastState") or {}).get("terminated") or {}
            )
    return {}


def pod_outcome(pod: Obj, container: str = contract.CONTAINER_NAME) -> PodOutcome:
    """How a pod ended, read off ``container`` (the trainer's, or the exporter's in an ExportJob's pod)."""
    meta, status = pod.get("metadata", {}), pod.get("status", {})
    terminated = _terminated(pod, container)
    disrupted = (
        any(c.get("type") == "DisruptionTarget" and c.get("status") == "True" for c in status.get("conditions") or [])
        or status.get("reason") in _DISRUPTION_REASONS
    )
    return PodOutcome(
        name=meta.get("name", ""),
        index=L.completion_index(pod) or 0,
        exit_code=terminated.get("exitCode"),
        message=(terminated.get("message") or "").strip(),
        disrupted=disrupted,
        finished_at=terminated.get("finishedAt") or "",
        pod_reason=status.get("reason") or terminated.get("reason") or "",
    )


def rank0_report(pods: Iterable[Obj]) -> TrainerReport | None:
    """Rank 0's termination message, parsed; None when it left none (or not the trainer's JSON)."""
    for outcome in map(pod_outcome, pods):
        if outcome.index == 0 and outcome.message:
            return parse_report(outcome.message)
    return None


@dataclass(frozen=True)
class Failure:
    retriable: bool
    message: str
    exit_code: int | None = None
    pods: tuple[str, ...] = field(default_factory=tuple)


def _describe(outcome: PodOutcome) -> str:
    if outcome.exit_code is None:
        what = f"pod {outcome.name} was disrupted ({outcome.pod_reason or 'DisruptionTarget'})"
    else:
        what = f"pod {outcome.name} (rank {outcome.index}) exited with code {outcome.exit_code}"
        if (reported := effective_exit_code(outcome)) != outcome.exit_code:
            what += f" (the trainer's exit code: {reported})"
    text = message_text(outcome.message) if outcome.message else ""
    return f"{what}: {text}" if text else what


def classify(pods: Iterable[Obj], job: Obj, retriable_exit_codes: Iterable[int]) -> Failure:
    """Decide whether a failed attempt is worth a whole-gang restart, naming the pod that caused it.

    A disrupted pod makes the attempt retriable whatever its peers did afterwards (a lost node shows up
    late, after the survivors' rendezvous errors). Otherwise the earliest failure is the cause: peers that
    lose a rank fail after it; on a tie the non-retriable one wins. A rank reporting invalid input (exit 2) is the
    cause whenever there is one: an invalid input is never retried.
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

    # Invalid input is decided by the input alone, so any rank that says so settles it, even after a peer that
    # failed first for a reason of its own (under load, a rank that lost its peer can exit 1 a second earlier).
    invalid = [o for o in failed if effective_exit_code(o) == ExitCode.INVALID]
    cause = min(invalid or failed, key=lambda o: (o.finished_at or "~", healable(o), o.index))
    return Failure(
        retriable=healable(cause),
        message=_describe(cause)[:MESSAGE_LIMIT],
        exit_code=effective_exit_code(cause),
        pods=names,
    )


def effective_exit_code(outcome: PodOutcome) -> int:
    """The trainer's own exit code when its termination message carries one (torchrun turns every child
    failure into 1), else the container's."""
    report = parse_report(outcome.message)
    reported = report.exit_code if report is not None else None
    if reported is not None and reported > 0 and (outcome.exit_code or 0) < 128:
        return int(reported)
    return outcome.exit_code or 0


def _job_failure_message(job: Obj) -> str:
    # FailureTarget comes first and is all there is while the failed Job's other pods terminate (job_view counts
    # it as failed); by then an evicted pod is usually gone, its kubelet having deleted the object.
    conditions = [c for c in job.get("status", {}).get("conditions") or [] if c.get("status") == "True"]
    for kind in ("Failed", "FailureTarget"):
        for condition in conditions:
            if condition.get("type") == kind:
                return f"{condition.get('reason', '')}: {condition.get('message', '')}".strip(": ")
    return ""
