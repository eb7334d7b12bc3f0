"""Which spec an attempt runs, and what changed since: pure helpers for ``status.next_status``.

Each attempt's Job records the spec it was rendered from (annotations): the TrainingJob's generation, a
short hash per top-level section of the *user's* spec (not the resolved one, so a changed operator default
never shows as an edit) and ``epochs``. Comparing that with the current spec tells the state machine which
edits the running attempt does not have yet.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

SPEC_GENERATION = "kiln.dev/spec-generation"
SPEC_DIGEST = "kiln.dev/spec-digest"
SPEC_EPOCHS = "kiln.dev/spec-epochs"

# runPolicy fields the operator applies to the running attempt at once; the rest of runPolicy
# (queueName, priorityClassName, terminationGracePeriodSeconds) is baked into the pods.
IMMEDIATE_RUN_POLICY = frozenset(
    {"suspend", "maxRestarts", "retriableExitCodes", "activeDeadlineSeconds", "ttlSecondsAfterFinished"}
)


@dataclass(frozen=True)
class AppliedSpec:
    """A spec as an attempt sees it: its generation, a hash per top-level section, and epochs."""

    generation: int | None
    epochs: int
    sections: Mapping[str, str] = field(default_factory=dict, hash=False)

    def annotations(self) -> dict[str, str]:
        digest = json.dumps(dict(sorted(self.sections.items())), separators=(",", ":"))
        generation = "" if self.generation is None else str(self.generation)
        return {SPEC_GENERATION: generation, SPEC_DIGEST: digest, SPEC_EPOCHS: str(self.epochs)}


def _short_hash(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def spec_sections(spec: Mapping[str, Any]) -> dict[str, str]:
    """{top-level spec key: short hash}, leaving out the runPolicy fields that never need a new attempt."""
    sections: dict[str, str] = {}
    for key, value in spec.items():
        if key == "runPolicy" and isinstance(value, Mapping):
            sections[key] = _short_hash({k: v for k, v in value.items() if k not in IMMEDIATE_RUN_POLICY})
        else:
            sections[key] = _short_hash(value)
    return sections


def applied_spec(spec: Mapping[str, Any], generation: int | None, epochs: int) -> AppliedSpec:
    """The AppliedSpec of a TrainingJob's spec (its raw ``.spec``) at ``generation``."""
    return AppliedSpec(generation=generation, epochs=epochs, sections=spec_sections(spec))


def from_annotations(annotations: Mapping[str, str] | None) -> AppliedSpec | None:
    """What a Job's annotations say its attempt runs; None for a Job without them (an older operator's)."""
    annotations = annotations or {}
    try:
        sections = json.loads(annotations[SPEC_DIGEST])
        epochs = int(annotations[SPEC_EPOCHS])
        generation_text = annotations.get(SPEC_GENERATION) or ""
        generation = int(generation_text) if generation_text else None
    except (KeyError, ValueError, TypeError):
        return None
    if not isinstance(sections, dict):
        return None
    return AppliedSpec(generation=generation, epochs=epochs, sections={str(k): str(v) for k, v in sections.items()})


def changed_sections(current: AppliedSpec, running: AppliedSpec) -> tuple[str, ...]:
    """The top-level spec sections that differ, sorted; none when the generation is the same.

    The generation guard matters: the apiserver fills in defaults a newer CRD added when it reads an object
    (without a new generation), which would otherwise look like an edit after an upgrade.
    """
    if current.generation is not None and current.generation == running.generation:
        return ()
    keys = set(current.sections) | set(running.sections)
    return tuple(sorted(k for k in keys if current.sections.get(k) != running.sections.get(k)))
