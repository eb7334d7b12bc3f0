"""The TrainingJob schedule's resyncs: the safety net for missed events, so only for jobs events left alone."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

from kiln.api.contract import Annotation
from kiln.operator.background import RETRY_DELAY_S, Background, Schedule

WALL = datetime(2026, 1, 1, tzinfo=UTC)  # only TTL deletes read the wall clock


def pending(name: str) -> dict[str, object]:
    return {"metadata": {"name": name, "namespace": "ml"}, "status": {"phase": "Pending"}}


def resynced(schedule: Schedule, now: float) -> list[str]:
    return sorted(key[1] for kind, key, _ in schedule.due(now, WALL) if kind == "resync")


def test_a_reconcile_puts_the_next_resync_a_full_interval_away() -> None:
    schedule = Schedule(60.0, None)
    for name in ("busy", "quiet"):
        schedule.observe("ml", name, pending(name), now=0.0)
    schedule.reconciled("ml", "busy", now=50.0)  # a Job event reconciled it
    assert resynced(schedule, 60.0) == ["quiet"]
    assert resynced(schedule, 109.0) == []
    assert resynced(schedule, 110.0) == ["busy"]
    assert resynced(schedule, 120.0) == ["quiet"]


def test_a_reconcile_never_brings_a_resync_forward_and_ignores_unknown_jobs() -> None:
    schedule = Schedule(60.0, None)
    schedule.observe("ml", "a", pending("a"), now=100.0)  # due at 160
    schedule.reconciled("ml", "a", now=10.0)  # a late-arriving report from a thread that started long ago
    schedule.reconciled("ml", "never-seen", now=10.0)
    assert resynced(schedule, 159.0) == []
    assert resynced(schedule, 160.0) == ["a"]


def test_the_schedule_keeps_each_body_without_its_managed_fields() -> None:
    """Kept for every job the operator sees, and read by nothing: over half of a TrainingJob's memory."""
    schedule = Schedule(60.0, None)
    managed = [{"manager": "kiln-operator", "operation": "Update", "fieldsV1": {"f:status": {}}}]
    body = {**pending("a"), "metadata": {"name": "a", "namespace": "ml", "managedFields": managed}}
    schedule.observe("ml", "a", body, now=0.0)
    [(_, _, kept)] = list(schedule.due(60.0, WALL))
    assert kept == {**pending("a"), "metadata": {"name": "a", "namespace": "ml"}}
    assert body["metadata"]["managedFields"] == managed  # the watch event's own body is left as it was


def running(annotations: dict[str, str] | None = None) -> dict[str, object]:
    metadata = {"name": "a", "namespace": "ml", "annotations": annotations or {}}
    return {"metadata": metadata, "status": {"phase": "Running"}}


def polled(schedule: Schedule, now: float) -> list[str]:
    return [key[1] for kind, key, _ in schedule.due(now, WALL) if kind == "progress"]


def test_a_stop_or_checkpoint_request_is_polled_at_the_next_tick_not_the_next_interval() -> None:
    schedule = Schedule(60.0, 30.0)
    schedule.observe("ml", "a", running(), now=0.0)
    assert polled(schedule, 0.0) == ["a"]
    assert polled(schedule, 10.0) == []  # the next poll is due at 30
    schedule.observe("ml", "a", running(), now=10.0)  # a status write: nothing asked
    assert polled(schedule, 10.5) == []
    schedule.observe("ml", "a", running({Annotation.STOP: Annotation.STOP_VALUE}), now=11.0)
    assert polled(schedule, 11.5) == ["a"]


def test_a_finished_job_is_deleted_its_ttl_after_its_completion_time() -> None:
    schedule = Schedule(60.0, None)
    finished = {"metadata": {"name": "a", "namespace": "ml"}, "spec": {"runPolicy": {"ttlSecondsAfterFinished": 90}},
                "status": {"phase": "Succeeded", "completionTime": "2026-01-01T00:00:00Z"}}  # fmt: skip
    schedule.observe("ml", "a", finished, now=0.0)
    expired = [key[1] for kind, key, _ in schedule.due(1.0, WALL + timedelta(seconds=89)) if kind == "expire"]
    assert expired == []
    expired = [key[1] for kind, key, _ in schedule.due(2.0, WALL + timedelta(seconds=90)) if kind == "expire"]
    assert expired == ["a"]


def test_resyncs_in_flight_are_capped_and_the_postponed_ones_run_next() -> None:
    """Resyncs share the handlers' threads: on a slow apiserver they must not take them all."""
    schedule = Schedule(60.0, None)
    for index in range(6):
        schedule.observe("ml", f"j{index}", pending(f"j{index}"), now=-60.0)  # all due at once
    release, started, running, most = threading.Event(), [], [0], [0]
    lock = threading.Lock()

    def resync(_: str, name: str, __: object) -> None:
        with lock:
            started.append(name)
            running[0] += 1
            most[0] = max(most[0], running[0])
        release.wait(10)
        with lock:
            running[0] -= 1

    async def run() -> None:
        background = Background((schedule, {"resync": resync}), tick_s=0.01, max_resyncs=2)
        background.start(ThreadPoolExecutor(8))
        while len(started) < 2:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)  # twenty ticks with both slots taken
        assert sorted(started) == ["j0", "j1"]
        release.set()
        deadline = time.monotonic() + 10
        while len(started) < 6 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await background.stop()

    asyncio.run(run())
    assert sorted(started) == [f"j{index}" for index in range(6)] and most[0] == 2


def test_a_postponed_resync_goes_before_those_that_fell_due_after_it() -> None:
    """Resyncs falling due faster than the cap lets them run: each tick one starts and the rest are postponed, as
    Background does. Handed out in insertion order, the two older jobs took turns and the newest never ran."""
    schedule = Schedule(1.0, None)
    schedule.observe("ml", "old-a", pending("old-a"), now=0.0)  # due at 1.0
    schedule.observe("ml", "old-b", pending("old-b"), now=0.0)  # due at 1.0
    schedule.observe("ml", "new", pending("new"), now=0.5)  # due at 1.5
    started = []
    for tick in range(2, 12):  # every 0.5 s from 1.0; one slot, and a resync is over by the next tick
        due = [key for kind, key, _ in schedule.due(tick / 2, WALL) if kind == "resync"]
        if due:
            started.append(due[0][1])
        for key in due[1:]:
            schedule.postpone_resync(key)
    assert started[:3] == ["old-a", "old-b", "new"], started
    assert {name: started.count(name) for name in ("old-a", "old-b", "new")} == {"old-a": 4, "old-b": 3, "new": 3}


def test_a_failed_resync_is_tried_again_after_the_retry_delay_not_a_full_interval() -> None:
    """An API or connection error in a resync (a node-loss restart's create, in CI) retries RETRY_DELAY_S later."""
    schedule = Schedule(60.0, None)
    schedule.observe("ml", "a", pending("a"), now=time.monotonic() - 60.0)  # due now
    tries: list[float] = []

    def resync(_: str, __: str, ___: object) -> None:
        tries.append(time.monotonic())
        if len(tries) == 1:
            raise ConnectionError("the apiserver hung up")

    async def run() -> None:
        background = Background((schedule, {"resync": resync}), tick_s=0.01)
        background.start(ThreadPoolExecutor(2))
        deadline = time.monotonic() + RETRY_DELAY_S + 5
        while len(tries) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await background.stop()

    asyncio.run(run())
    assert len(tries) == 2, tries
    assert RETRY_DELAY_S <= tries[1] - tries[0] < RETRY_DELAY_S + 1, tries
