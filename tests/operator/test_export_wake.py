"""A TrainingJob's change wakes exactly the ExportJobs waiting for it: the pure part (``Schedule.wake`` with
``export_reconcile.waits_for``), without waiting for the 60 s resync."""

from __future__ import annotations

import asyncio
import contextvars
import time
from datetime import UTC, datetime
from typing import Any

from kiln.operator.background import Background, Schedule
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


def test_background_actions_see_the_context_of_the_task_that_started_it() -> None:
    """kopf.event reads kopf's context variables; a woken resync that posts an Event runs in an executor thread, where
    run_in_executor alone would leave them unset (Events of background resyncs were lost with a LookupError)."""
    kopfs = contextvars.ContextVar[str]("kopfs")
    seen: list[str] = []

    async def run() -> None:
        kopfs.set("set by kopf before the startup handler")
        schedule = Schedule(60.0, None)
        schedule.observe("ml", "waiting", export("waiting", "digits", phase="Pending"), now=time.monotonic())
        schedule.wake("ml", lambda body: waits_for(body, "digits"))
        background = Background((schedule, {"resync": lambda *_: seen.append(kopfs.get())}), tick_s=0.01)
        background.start(None)
        deadline = time.monotonic() + 10
        while (background.busy or not seen) and time.monotonic() < deadline:  # the action ran, or failed
            await asyncio.sleep(0.01)
        await background.stop()

    asyncio.run(run())
    assert seen == ["set by kopf before the startup handler"]


def test_background_actions_run_in_the_kopf_handler_context_it_adopted() -> None:
    """kopf sets its event queue's variables for each object's handlers only, not for the startup handler that
    starts Background: the resyncs of the 200-job benchmark lost their Events to a LookupError until the
    operator's watch handlers handed their context over (adopt_context)."""
    kopfs = contextvars.ContextVar[str]("kopfs")
    seen: list[str] = []

    async def run() -> None:
        schedule = Schedule(60.0, None)
        schedule.observe("ml", "waiting", export("waiting", "digits", phase="Pending"), now=time.monotonic())
        background = Background((schedule, {"resync": lambda *_: seen.append(kopfs.get("unset"))}), tick_s=0.01)
        background.start(None)  # in a context without the variable, as kopf's startup handler is

        async def handler() -> None:  # a task of its own, as kopf runs each object's handlers
            kopfs.set("set by kopf for its handlers")
            background.adopt_context(contextvars.copy_context())

        await asyncio.create_task(handler())
        schedule.wake("ml", lambda body: waits_for(body, "digits"))
        deadline = time.monotonic() + 10
        while (background.busy or not seen) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await background.stop()

    asyncio.run(run())
    assert seen == ["set by kopf for its handlers"]
