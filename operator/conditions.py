"""The toolkit both state machines (``status`` for TrainingJobs, ``export_status`` for ExportJobs) write status with:
conditions whose lastTransitionTime moves only on a flip, the Transitions that become Events, and the merge patch of
what changed."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from kiln.api.status import Condition, ConditionType, ExportJobStatus, Reason, TrainingJobStatus

Obj = dict[str, Any]
C = ConditionType


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


@dataclass(frozen=True)
class Transition:
    type: ConditionType
    status: str
    reason: str
    message: str
    alert: bool = False
    """Worth a Warning Event although no failure: what stands in the way of a condition (``explain``)."""

    @property
    def warning(self) -> bool:
        return self.alert or (self.status == "True" and self.type in (C.FAILED, C.RESTARTING))


class ConditionBuilder:
    """Accumulates condition changes on a status; lastTransitionTime moves only when a status flips."""

    def __init__(self, status: TrainingJobStatus | ExportJobStatus, now: datetime, generation: int | None) -> None:
        self.conditions = {c.type: c for c in status.conditions}
        self.now, self.generation = rfc3339(now), generation
        self.transitions: list[Transition] = []

    def set(self, type_: ConditionType, status: bool, reason: Reason | str, message: str = "") -> None:
        value = "True" if status else "False"
        old = self.conditions.get(type_)
        if old is None and not status:
            return  # a condition that never held is simply absent
        if self._put(type_, value, str(reason), message):
            self.transitions.append(Transition(type_, value, str(reason), message))

    def explain(self, type_: ConditionType, reason: Reason | str, message: str, *, alert: bool = False) -> None:
        """``type_`` False with what keeps it from coming true, even if it never held. A new reason is a Transition
        (an Event), as a flip is; the same reason with a new message is not."""
        reason, old = str(reason), self.conditions.get(type_)
        news = old is None or old.status != "False" or old.reason != reason
        self._put(type_, "False", reason, message)
        if news:
            self.transitions.append(Transition(type_, "False", reason, message, alert=alert))

    def _put(self, type_: ConditionType, value: str, reason: str, message: str) -> bool:
        """Store the condition; True when its status flipped (or it is new)."""
        old = self.conditions.get(type_)
        if old is not None and (old.status, old.reason, old.message) == (value, reason, message):
            return False
        changed = old is None or old.status != value
        self.conditions[type_] = Condition(
            type=type_,
            status=value,
            reason=reason,
            message=message,
            last_transition_time=self.now if changed or old is None else old.last_transition_time,
            observed_generation=self.generation,
        )
        return changed

    def holds(self, type_: ConditionType) -> bool:
        old = self.conditions.get(type_)
        return old is not None and old.status == "True"

    def ordered(self) -> list[Condition]:
        return [self.conditions[t] for t in ConditionType if t in self.conditions]


def merge_model(current: Any, model: type[Any], reported: Obj) -> Any:
    base = current.to_dict() if current is not None else {}
    try:
        return model.model_validate({**base, **reported})
    except ValueError:
        return current


def status_patch(old: Obj, new: TrainingJobStatus | ExportJobStatus) -> Obj:
    """The top-level status keys that changed, as a JSON merge patch (None deletes a key)."""
    wanted = new.to_dict()
    patch: Obj = {key: value for key, value in wanted.items() if old.get(key) != value}
    for key in ("startTime", "completionTime"):
        if key in old and key not in wanted:
            patch[key] = None
    return patch
