"""A TrainingJob's change wakes exactly the ExportJobs waiting for it: the pure part (``Schedule.wake`` with
``export_reconcile.waits_for``), without waiting for the 60 s resync."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from kiln.operator.background import Schedule
from kiln.operator.export_reconcile import waits_for

WALL = datetime(2026, 1, 1, tzinfo=UTC)  # only TTL deletes read the wall clock; ExportJobs have none


def export(name: str, source: str, namespace: str = "ml", **status: Any) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": namespace}, "spec": {"source": {"trainingJob": source}},
            "status": status}  # fmt: skip


def test_wake_resyncs_only_the_unstarted_exports_of_that_trainingjob_at_the_next_tick() -> None:
    schedule = Schedule(60.0, None)
    created = {"phase": "Pending", "conditions": [{"type": "Created", "status": "True"}]}
    bodies = {
        "waiting": export("waiting", "digits", phase="Pending"),
        "started": export("started", "digits", **created),
        "finished": export("finished", "digits", phase="Failed"),
        "other-source": export("other-source", "flowers", phase="Pending"),
        "explicit-uri": {"metadata": {"name": "explicit-uri"}, "spec": {"source": {"checkpointUri": "s3://b/x"}}},
    }
    for name, body in bodies.items():
        schedule.observe("ml", name, body, now=0.0)
    schedule.observe("team-b", "waiting", export("waiting", "digits", "team-b"), now=0.0)
    assert list(schedule.due(1.0, WALL)) == []  # the first resync is 60 s away

    schedule.wake("ml", lambda body: waits_for(body, "digits"))
    due = [(kind, key) for kind, key, _ in schedule.due(1.0, WALL)]
    assert due == [("resync", ("ml", "waiting"))]
    assert list(schedule.due(2.0, WALL)) == []  # once


def test_an_export_schedule_never_polls_progress() -> None:
    schedule = Schedule(60.0, None)
    schedule.observe("ml", "running", export("running", "digits", phase="Running"), now=0.0)
    assert [kind for kind, _, _ in schedule.due(61.0, WALL)] == ["resync"]
