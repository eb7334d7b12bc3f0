"""Work by key, as client-go's workqueue does it: one run at a time per key, newer work replacing what waits; and,
as controller-runtime's priority queue does, urgent work first.

The watches (``watches``) hand their reconciles and repairs to a ``WorkQueue``: a Job sends several events while
its pods start, and each would otherwise cost a reconcile, i.e. a status write. A new TrainingJob's reconcile is
urgent: its Job is what a user waits for, and it would otherwise queue behind whatever fills the queue, such as
the reconcile of every TrainingJob after an operator restart, or a mass completion. (A burst of creations alone
leaves nothing to pass: docs/benchmarks.md measured no difference there.)
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import Executor

Work = Callable[[], object]
log = logging.getLogger(__name__)


class WorkQueue:
    """Runs work by key in an executor, one at a time per key and at most ``slots`` at once, urgent work before the
    rest and each in the order it became ready. Work that comes for a key while earlier work for it waits (its
    delay, its turn, or the key's previous run) replaces that work, which it supersedes: each takes the latest
    TrainingJob when it runs and carries the newest Job; it is urgent if either was. ``submit(after_s=...)`` waits
    that long before the run, so the events that come meanwhile cost nothing more.

    ``slots`` (the executor's threads) is what makes the order matter: beyond it, work waits here, where urgent
    work can pass, instead of in the executor's first-come queue. The rest still runs whenever no urgent work
    waits; a burst of creations ends, so it cannot starve."""

    def __init__(self, executor: Executor, slots: int) -> None:
        self.executor = executor
        self.slots = slots
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._running: set[Hashable] = set()
        self._waiting: dict[Hashable, Work] = {}
        """The latest work of each key that is delayed, ready, or behind its key's run."""
        self._urgent: set[Hashable] = set()
        """The keys whose waiting work is urgent."""
        self._delayed: dict[Hashable, float] = {}
        """When each delayed key is due (monotonic s)."""
        self._due: list[tuple[float, int, Hashable]] = []
        """(due, tie-breaker, key), soonest first; an entry whose due is no longer the key's is stale."""
        self._ready: set[Hashable] = set()
        self._lanes: tuple[deque[Hashable], deque[Hashable]] = (deque(), deque())
        """Ready keys, urgent then the rest; an entry whose key is no longer ready (it ran from the other lane)
        is stale."""
        self._order = itertools.count()
        self._closed = False
        self._timer = threading.Thread(target=self._release_due, name="kiln-workqueue", daemon=True)
        self._timer.start()

    def submit(self, key: Hashable, work: Work, after_s: float = 0.0, *, urgent: bool = False) -> None:
        with self._lock:
            self._waiting[key] = work
            if urgent:
                self._urgent.add(key)
            if key in self._running:
                return
            if key in self._ready:
                if urgent:  # its entry in the other lane goes stale
                    self._lanes[0].append(key)
                return
            due = time.monotonic() + after_s
            if self._delayed.get(key, float("inf")) <= due:  # already delayed, and due no later
                return
            if after_s > 0:
                self._delayed[key] = due
                heapq.heappush(self._due, (due, next(self._order), key))
                self._wake.notify()
                return
            self._delayed.pop(key, None)  # its heap entry is left behind, stale
            self._make_ready(key)
            started = self._take_ready()
        self._start(started)

    def close(self) -> None:
        """Start nothing more that is delayed; runs in progress finish."""
        with self._lock:
            self._closed = True
            self._wake.notify()

    def _make_ready(self, key: Hashable) -> None:
        self._ready.add(key)
        self._lanes[0 if key in self._urgent else 1].append(key)

    def _take_ready(self) -> list[tuple[Hashable, Work]]:
        """The ready work that free slots can start now, marked running; under the lock."""
        started: list[tuple[Hashable, Work]] = []
        for lane in self._lanes:
            while lane and len(self._running) < self.slots:
                key = lane.popleft()
                if key in self._ready:
                    self._ready.discard(key)
                    self._urgent.discard(key)
                    self._running.add(key)
                    started.append((key, self._waiting.pop(key)))
        return started

    def _release_due(self) -> None:
        while True:
            with self._lock:
                while not self._closed and (not self._due or self._due[0][0] > time.monotonic()):
                    self._wake.wait(self._due[0][0] - time.monotonic() if self._due else None)
                if self._closed:
                    return
                while self._due and self._due[0][0] <= time.monotonic():
                    at, _, key = heapq.heappop(self._due)
                    if self._delayed.get(key) == at:
                        del self._delayed[key]
                        self._make_ready(key)
                started = self._take_ready()
            self._start(started)

    def _start(self, started: list[tuple[Hashable, Work]]) -> None:
        for key, work in started:
            try:
                self.executor.submit(self._run, key, work)
            except RuntimeError:  # the executor shut down: the operator is stopping
                return

    def _run(self, key: Hashable, work: Work) -> None:
        try:
            work()
        except Exception as exc:
            log.warning("%s failed, will resync: %s", key, exc)
        finally:
            with self._lock:
                self._running.discard(key)
                if key in self._waiting and key not in self._delayed:
                    self._make_ready(key)
                started = self._take_ready()
            self._start(started)
