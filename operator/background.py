"""Periodic work per TrainingJob and ExportJob without kopf timers or daemons: resyncs, progress polls, TTL.

kopf puts a finalizer on every object that a timer or daemon matches, so that it can stop them before the
object goes: one PATCH to add it, one to remove it, a lost handling cycle (the create handler waits for
the finalizer's own watch event) and deletes that hang while the operator is down. None of that is needed
here: the children are cleaned up by ownerReferences, and every periodic action tolerates a TrainingJob
that is already gone. So one asyncio task walks an in-memory table of TrainingJobs, kept current by the
TrainingJob event handler, and hands due work to the handlers' thread pool. ExportJobs get a second
table (``track-export``) with resyncs only; a TrainingJob's phase change wakes the ExportJobs waiting for it.

``Schedule`` is the pure part (what is due when); ``Background`` runs it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from kiln.api.status import TERMINAL_PHASES, Phase
from kiln.operator.conditions import parse_time
from kiln.operator.control import control_annotations

Obj = dict[str, Any]
TERMINAL = {p.value for p in TERMINAL_PHASES}
log = logging.getLogger(__name__)


@dataclass
class Entry:
    body: Obj
    next_resync: float
    resync_was_due: float = 0.0
    """When the resync last handed out was due: a postponed one keeps its place in the queue (``postpone_resync``)."""
    next_progress: float = 0.0
    next_expire: float = 0.0
    """No TTL delete before this (monotonic s): one delete in flight, and a failed one retried 5 s later."""

    @property
    def phase(self) -> str:
        return str((self.body.get("status") or {}).get("phase") or Phase.PENDING.value)

    def expires_at(self) -> datetime | None:
        """When a finished job with runPolicy.ttlSecondsAfterFinished is due for deletion, else None."""
        ttl = ((self.body.get("spec") or {}).get("runPolicy") or {}).get("ttlSecondsAfterFinished")
        if ttl is None or self.phase not in TERMINAL:
            return None
        finished = parse_time((self.body.get("status") or {}).get("completionTime")) or datetime.now(UTC)
        return finished + timedelta(seconds=float(ttl))


class Schedule:
    """The TrainingJobs this operator sees and when each one's periodic work is next due (monotonic s)."""

    def __init__(self, resync_interval_s: float, progress_interval_s: float | None) -> None:
        """``progress_interval_s`` None: no progress polls (ExportJobs report only when they exit)."""
        self.resync_interval_s, self.progress_interval_s = resync_interval_s, progress_interval_s
        self.entries: dict[tuple[str, str], Entry] = {}

    def observe(self, namespace: str, name: str, body: Obj | None, now: float) -> None:
        """Record the latest body from a watch event; None (deleted) forgets the job."""
        key = (namespace, name)
        if body is None:
            self.entries.pop(key, None)
            return
        body = without_managed_fields(body)
        if key in self.entries:
            entry = self.entries[key]
            if control_annotations(_annotations(body)) != control_annotations(_annotations(entry.body)):
                entry.next_progress = 0.0  # a stop or checkpoint request: deliver it at the next tick
            entry.body = body
        else:
            self.entries[key] = Entry(body=body, next_resync=now + self.resync_interval_s)

    def reconciled(self, namespace: str, name: str, now: float) -> None:
        """A reconcile of this job just finished: its next resync is a full interval away. A resync is the safety
        net for missed events, so a job that events keep reconciling needs none; without this, every unfinished job
        cost two reads (the TrainingJob, its Job) each interval however recently it was reconciled. Called from
        handler threads: one float store, so a race costs at most one early or late resync."""
        entry = self.entries.get((namespace, name))
        if entry is not None:
            entry.next_resync = max(entry.next_resync, now + self.resync_interval_s)

    def postpone_resync(self, key: tuple[str, str]) -> None:
        """A resync that was due but not started (too many in flight): due again at the next tick, as overdue as
        it was, so it goes before every resync that fell due after it (``due`` hands the most overdue out first)."""
        entry = self.entries.get(key)
        if entry is not None:
            entry.next_resync = entry.resync_was_due

    def resync_soon(self, namespace: str, name: str, at: float) -> None:
        """Resync this job at ``at`` (monotonic s) if not sooner: the retry of a reconcile that failed."""
        entry = self.entries.get((namespace, name))
        if entry is not None:
            entry.next_resync = min(entry.next_resync, at)

    def wake(self, namespace: str, matches: Callable[[Obj], bool]) -> None:
        """Resync, at the next tick, the objects of ``namespace`` whose latest body ``matches``."""
        for (entry_namespace, _), entry in self.entries.items():
            if entry_namespace == namespace and entry.phase not in TERMINAL and matches(entry.body):
                entry.next_resync = 0.0

    def due(self, now: float, wall: datetime) -> Iterator[tuple[str, tuple[str, str], Obj]]:
        """("resync" | "progress" | "expire", key, body) for every action due now, advancing its clock.

        Walks every entry each tick (0.5 s), on the event loop, so each entry does only what its phase needs: a
        finished job checks its TTL, an unfinished one its two clocks. 1,000 jobs without TTLs took 20 ms a tick
        before that, 10 ms after, on the saturated 2-core benchmark VM."""
        running, polls = Phase.RUNNING.value, self.progress_interval_s is not None
        resyncs: list[tuple[float, tuple[str, str], Entry]] = []
        for key, entry in list(self.entries.items()):
            phase = entry.phase
            if phase not in TERMINAL:
                if now >= entry.next_resync:
                    resyncs.append((entry.next_resync, key, entry))
                if polls and phase == running and now >= entry.next_progress:
                    entry.next_progress = now + (self.progress_interval_s or 0.0)
                    yield "progress", key, entry.body
                continue
            expires = entry.expires_at()
            if expires is not None and wall >= expires and now >= entry.next_expire:
                entry.next_expire = now + 5.0
                yield "expire", key, entry.body
        # The most overdue first: with resyncs capped (Background), walking in insertion order let the oldest jobs
        # take every free slot each tick once resyncs fell due faster than they finished, and the newest starved.
        for was_due, key, entry in sorted(resyncs, key=lambda item: item[0]):
            entry.resync_was_due, entry.next_resync = was_due, now + self.resync_interval_s
            yield "resync", key, entry.body


def without_managed_fields(body: Obj) -> Obj:
    """A shallow copy without metadata.managedFields, which nothing here reads: over half of a TrainingJob's
    size as Python objects (30 KB with, 12 KB without), kept for every job the operator sees."""
    metadata = body.get("metadata") or {}
    if "managedFields" not in metadata:
        return body
    return {**body, "metadata": {k: v for k, v in metadata.items() if k != "managedFields"}}


def _annotations(body: Obj) -> dict[str, str] | None:
    return (body.get("metadata") or {}).get("annotations")


Action = Callable[[str, str, Obj], object]


RETRY_DELAY_S = 2.0
"""Seconds before a reconcile or resync that an API or connection error stopped is tried again, as a resync: not
the next 60 s resync (``Settings.resync_interval_s``), by which time a short attempt can have started and ended
unseen, or a node-loss restart waited a minute."""

MAX_RESYNCS_IN_FLIGHT = 4
"""Resyncs running at once, per Schedule. They share the handlers' threads, and each waits on the apiserver:
at 1,000 unfinished jobs on a saturated control plane the 60 s resyncs held a third of the 48 threads, so
event-driven reconciles queued behind the safety net. A cap on those in flight, not on a rate, slows resyncs
only while the apiserver is slow (4 in flight at 10 ms a call is 400 a second)."""


class Background:
    """Runs Schedules (TrainingJobs', ExportJobs'), each with its actions: every tick, starts each due action in
    the executor, at most one per action and object at a time, and at most ``max_resyncs`` resyncs per lane."""

    def __init__(
        self, *lanes: tuple[Schedule, dict[str, Action]], tick_s: float = 0.5, max_resyncs: int = MAX_RESYNCS_IN_FLIGHT
    ) -> None:
        self.lanes, self.tick_s, self.max_resyncs = lanes, tick_s, max_resyncs
        self.busy: set[tuple[int, str, tuple[str, str]]] = set()
        self.resyncs_in_flight = [0] * len(lanes)
        self.task: asyncio.Task[None] | None = None

    def start(self, executor: Executor | None) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run(executor), name="kiln-background")

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)

    async def _run(self, executor: Executor | None) -> None:
        loop = asyncio.get_running_loop()
        while True:
            for lane, (schedule, actions) in enumerate(self.lanes):
                for kind, key, body in schedule.due(time.monotonic(), datetime.now(UTC)):
                    if (lane, kind, key) in self.busy:
                        continue
                    if kind == "resync":
                        if self.resyncs_in_flight[lane] >= self.max_resyncs:
                            schedule.postpone_resync(key)
                            continue
                        self.resyncs_in_flight[lane] += 1
                    self.busy.add((lane, kind, key))
                    future = loop.run_in_executor(executor, actions[kind], key[0], key[1], body)
                    future.add_done_callback(functools.partial(self._done, (lane, kind, key)))
            await asyncio.sleep(self.tick_s)

    def _done(self, key: tuple[int, str, tuple[str, str]], future: asyncio.Future[object]) -> None:
        self.busy.discard(key)
        if key[1] == "resync":
            self.resyncs_in_flight[key[0]] -= 1
        if not future.cancelled() and future.exception() is not None:
            lane, kind, (namespace, name) = key
            if kind == "resync":
                self.lanes[lane][0].resync_soon(namespace, name, time.monotonic() + RETRY_DELAY_S)
            log.warning("%s of %s/%s failed, will retry: %s", kind, namespace, name, future.exception())
