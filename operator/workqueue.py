"""Work by key, as client-go's workqueue does it: one run at a time per key, newer work replacing what waits.

The watches (``watches``) hand their reconciles and repairs to a ``WorkQueue``: a Job sends several events while
its pods start, and each would otherwise cost a reconcile, i.e. a status write.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Executor, Future

Work = Callable[[], object]
log = logging.getLogger(__name__)


class WorkQueue:
    """Runs work by key in an executor, one at a time per key. Work that comes for a key while earlier work for it
    waits (its delay, or the key's previous run) replaces that work, which it supersedes: each takes the latest
    TrainingJob when it runs and carries the newest Job. ``submit(after_s=...)`` waits that long before the run, so
    the events that come meanwhile cost nothing more."""

    def __init__(self, executor: Executor) -> None:
        self.executor = executor
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._running: set[Hashable] = set()
        self._waiting: dict[Hashable, Work] = {}
        """The latest work of each key that is delayed or behind its key's run."""
        self._delayed: dict[Hashable, float] = {}
        """When each delayed key is due (monotonic s)."""
        self._due: list[tuple[float, int, Hashable]] = []
        """(due, tie-breaker, key), soonest first; an entry whose due is no longer the key's is stale."""
        self._order = itertools.count()
        self._closed = False
        self._timer = threading.Thread(target=self._release_due, name="kiln-workqueue", daemon=True)
        self._timer.start()

    def submit(self, key: Hashable, work: Work, after_s: float = 0.0) -> None:
        with self._lock:
            self._waiting[key] = work
            if key in self._running:
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
            del self._waiting[key]
            self._running.add(key)
        self._start(key, work)

    def close(self) -> None:
        """Start nothing more that is delayed; runs in progress finish."""
        with self._lock:
            self._closed = True
            self._wake.notify()

    def _release_due(self) -> None:
        while True:
            with self._lock:
                while not self._closed and (not self._due or self._due[0][0] > time.monotonic()):
                    self._wake.wait(self._due[0][0] - time.monotonic() if self._due else None)
                if self._closed:
                    return
                due: list[tuple[Hashable, Work]] = []
                while self._due and self._due[0][0] <= time.monotonic():
                    at, _, key = heapq.heappop(self._due)
                    if self._delayed.get(key) == at:
                        del self._delayed[key]
                        due.append((key, self._waiting.pop(key)))
                        self._running.add(key)
            for key, work in due:  # outside the lock: a run that ends at once calls _done on this thread
                self._start(key, work)

    def _start(self, key: Hashable, work: Work) -> None:
        try:
            future = self.executor.submit(work)
        except RuntimeError:  # the executor shut down: the operator is stopping
            return
        future.add_done_callback(functools.partial(self._done, key))

    def _done(self, key: Hashable, future: Future[object]) -> None:
        if not future.cancelled() and future.exception() is not None:
            log.warning("%s failed, will resync: %s", key, future.exception())
        with self._lock:
            work = self._waiting.pop(key, None)
            if work is None:
                self._running.discard(key)
                return
        self._start(key, work)
