"""What Kueue says about a Job it holds suspended, read off that Job's Workload (kueue.x-k8s.io).

A suspended queued Job looks the same whether Kueue has not admitted it yet or has evicted it (preemption, a
stopped ClusterQueue, a deactivated Workload); only the Workload's conditions tell them apart, and say why.
Pure: the caller (``reconcile.observe``) reads the Workload.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# A Kueue message can be long (it lists every flavor it tried); the status keeps the start of it.
MAX_MESSAGE = 1024


@dataclass(frozen=True)
class KueueVerdict:
    """Why Kueue keeps the Job suspended, in Kueue's own words."""

    evicted: bool
    """The Workload was admitted and then evicted (its Evicted condition is True)."""
    reason: str
    """Kueue's reason: the Evicted condition's (Preempted, ClusterQueueStopped, Deactivated, ...), else
    QuotaReserved's (Pending, Inadmissible)."""
    message: str


def workload_verdict(workload: dict[str, Any] | None) -> KueueVerdict | None:
    """None when there is no Workload yet, or it says nothing about why it waits."""
    if workload is None:
        return None
    conditions = {c.get("type"): c for c in (workload.get("status") or {}).get("conditions") or []}
    # Kueue keeps Evicted=True until it reserves quota again, so an evicted Workload says so while it waits.
    evicted = conditions.get("Evicted")
    if evicted is not None and evicted.get("status") == "True":
        return KueueVerdict(True, str(evicted.get("reason") or "Evicted"), _clip(evicted.get("message")))
    reserved = conditions.get("QuotaReserved")
    if reserved is not None and reserved.get("status") == "False":
        return KueueVerdict(False, str(reserved.get("reason") or "Pending"), _clip(reserved.get("message")))
    return None


def _clip(message: Any) -> str:
    text = " ".join(str(message or "").split())
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 3] + "..."
