"""Why an admitted attempt's workers are not running yet, read from its pods: a pure function over pod dicts.

A Job whose pods cannot start changes nothing the Job shows (it stays ``active``), so without this the TrainingJob
would sit in Pending with no word of why. Two kinds of waiting are told apart from a pod that is merely starting:
  - the scheduler found no node: PodScheduled=False, reason Unschedulable, with its message (too few GPUs, a
    missing PersistentVolumeClaim such as data.staging.cacheClaim, a taint, a node selector);
  - a container cannot be created: its waiting reason, verbatim (ErrImagePull, ImagePullBackOff,
    CreateContainerConfigError: a missing Secret or ConfigMap key, ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kiln.api.status import BLOCKED_CONTAINER_REASONS, BLOCKED_REASONS, ConditionType, Reason
from kiln.operator import labels as L
from kiln.operator.conditions import ConditionBuilder

Obj = dict[str, Any]


@dataclass(frozen=True)
class Blocked:
    """The first pod (by worker index) that cannot start, and why."""

    reason: str
    message: str


def blocked(pods: list[Obj]) -> Blocked | None:
    """Why the lowest-index worker that cannot start is stuck; None when every pod is running or on its way."""
    for pod in sorted(pods, key=lambda pod: L.completion_index(pod) or 0):
        why = _pod_blocked(pod)
        if why is not None:
            return why
    return None


def explain_waiting(b: ConditionBuilder, stuck: Blocked | None, checked: bool, starting: str) -> None:
    """Running=False with what keeps a pod from starting (``stuck``); once the pods were read (``checked``) and
    nothing does any more, ``starting`` (reason PodsStarting) replaces the earlier blocker."""
    running = b.conditions.get(ConditionType.RUNNING)
    if stuck is not None:
        b.explain(ConditionType.RUNNING, stuck.reason, stuck.message, alert=True)
    elif checked and running is not None and running.status == "False" and running.reason in BLOCKED_REASONS:
        b.explain(ConditionType.RUNNING, Reason.PODS_STARTING, starting)


def _pod_blocked(pod: Obj) -> Blocked | None:
    if pod.get("metadata", {}).get("deletionTimestamp"):
        return None
    status = pod.get("status") or {}
    name, index = pod.get("metadata", {}).get("name"), L.completion_index(pod)
    # An Indexed Job's pod is a worker of the gang; the ExportJob's lone exporter pod is just a pod.
    worker = f"pod {name}" if index is None else f"worker {index} (pod {name})"
    for condition in status.get("conditions") or []:
        unscheduled = condition.get("type") == "PodScheduled" and condition.get("status") == "False"
        if unscheduled and condition.get("reason") == Reason.UNSCHEDULABLE:
            return Blocked(Reason.UNSCHEDULABLE, f"{worker}: {condition.get('message') or 'no node fits it'}")
    statuses = (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or [])
    for container in statuses:
        waiting = (container.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in BLOCKED_CONTAINER_REASONS:
            detail = waiting.get("message") or waiting["reason"]
            return Blocked(waiting["reason"], f"{worker}, container {container.get('name')}: {detail}")
    return None
