"""A new TrainingJob's first status, held back once its children exist (``run_reconcile(hold_status=True)``).

Written at once, the first status PATCHes of a burst of creations slowed the apiserver's delivery of the next
TrainingJobs' events about tenfold, and that delivery was most of a burst's CR -> Job (docs/benchmarks.md). So the
write waits until the creations pause (``held_due``); meanwhile the next reconcile of the same version of the
TrainingJob decides from it as if it were written, and writes both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kiln.operator.reconcile import Outcome

Obj = dict[str, Any]
FIRST_STATUS_QUIET_S = 1.0
"""Seconds without a new TrainingJob after which the held first statuses are written. Held a fixed 2 s instead,
they still slowed the end of a longer burst (docs/benchmarks.md). The reconcile that carries one sooner is
typically its Job's first update's, ``handlers.JOB_PROGRESS_BATCH_S`` after the pods appear."""
FIRST_STATUS_MAX_HOLD_S = 10.0
"""Seconds a first status is held at most, for creations that never pause."""


@dataclass(frozen=True)
class Held:
    """A first status held back: the body it was decided from, and the outcome that carries its write."""

    body: Obj
    outcome: Outcome

    since: float
    """When it was held (monotonic s)."""

    @property
    def status(self) -> Obj:
        return self.outcome.decision.status.to_dict()

    def decided_from(self, body: Obj) -> bool:
        """Whether ``body`` is the very version it was decided from (nothing wrote the TrainingJob since)."""
        return bool(body["metadata"].get("resourceVersion") == self.body["metadata"].get("resourceVersion"))


def held_due(since: float, last_creation: float) -> float:
    """When a first status held since ``since`` is written (monotonic s): once no TrainingJob was created for
    FIRST_STATUS_QUIET_S, or once held FIRST_STATUS_MAX_HOLD_S. ``last_creation`` only moves later, so a time
    this gives may move too: ask again then."""
    return min(last_creation + FIRST_STATUS_QUIET_S, since + FIRST_STATUS_MAX_HOLD_S)
