"""The watches' work queue: one run at a time per key, newer work replacing what waits, and delays that
batch a key's events into one run; which Job updates wait."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from kiln.operator.handlers import settles
from kiln.operator.workqueue import WorkQueue
from kiln.testing.processes import wait_until


@pytest.fixture
def queue() -> Iterator[WorkQueue]:
    with ThreadPoolExecutor(max_workers=4) as pool:
        work = WorkQueue(pool, slots=4)
        yield work
        work.close()


def test_one_run_at_a_time_per_key_and_only_the_latest_of_what_waited(queue: WorkQueue) -> None:
    release, ran, lock = threading.Event(), [], threading.Lock()
    running: dict[str, int] = {}
    overlap: list[str] = []

    def work(key: str, label: str) -> None:
        with lock:
            running[key] = running.get(key, 0) + 1
            if running[key] > 1:
                overlap.append(key)
        if label == "first":
            release.wait(5)
        with lock:
            ran.append((key, label))
            running[key] -= 1

    queue.submit("a", lambda: work("a", "first"))
    time.sleep(0.1)
    for label in ("second", "third", "latest"):
        queue.submit("a", lambda label=label: work("a", label))  # type: ignore[misc]
    queue.submit("b", lambda: work("b", "other key"))
    wait_until(lambda: ("b", "other key") in ran, timeout=5, what="another key runs meanwhile")
    release.set()
    wait_until(lambda: len(ran) == 3, timeout=5, what="the latest")
    time.sleep(0.2)
    assert ran == [("b", "other key"), ("a", "first"), ("a", "latest")] and overlap == []


def test_failing_work_does_not_hold_its_key(queue: WorkQueue) -> None:
    done = threading.Event()
    queue.submit("a", lambda: 1 / 0)
    wait_until(lambda: not queue._running, timeout=5, what="the failure to finish")
    queue.submit("a", done.set)
    assert done.wait(5)


def test_a_delay_batches_what_comes_for_the_key_into_one_run_of_the_latest(queue: WorkQueue) -> None:
    ran: list[tuple[str, float]] = []
    started = time.monotonic()
    for label in ("first", "second", "latest"):
        queue.submit("a", lambda label=label: ran.append((label, time.monotonic() - started)), after_s=0.5)  # type: ignore[misc]
        time.sleep(0.1)
    queue.submit("b", lambda: ran.append(("undelayed", time.monotonic() - started)))
    wait_until(lambda: len(ran) == 2, timeout=5, what="both keys")
    time.sleep(0.7)
    (undelayed, b_at), (latest, a_at) = ran
    assert (undelayed, latest) == ("undelayed", "latest")
    assert b_at < 0.45 and 0.5 <= a_at < 1.0  # due 0.5 s after the first submit, not pushed back by the later ones


def test_work_without_a_delay_overtakes_the_delayed_work_of_its_key(queue: WorkQueue) -> None:
    ran: list[str] = []
    queue.submit("a", lambda: ran.append("delayed"), after_s=2.0)
    queue.submit("a", lambda: ran.append("at once"))
    wait_until(lambda: ran == ["at once"], timeout=1, what="the undelayed work")
    time.sleep(2.3)  # the delayed entry falls due, stale: nothing more runs
    assert ran == ["at once"]


def test_closed_nothing_delayed_starts(queue: WorkQueue) -> None:
    ran: list[str] = []
    queue.submit("a", lambda: ran.append("delayed"), after_s=0.3)
    queue.close()
    time.sleep(0.6)
    assert ran == []


def test_urgent_work_passes_what_waits_for_a_slot_and_the_rest_keeps_its_order() -> None:
    with ThreadPoolExecutor(max_workers=4) as pool:
        queue, release, ran = WorkQueue(pool, slots=1), threading.Event(), []
        queue.submit("busy", lambda: release.wait(5))
        queue.submit("a", lambda: ran.append("a"))
        queue.submit("b", lambda: ran.append("b"))
        queue.submit("new", lambda: ran.append("new"), urgent=True)
        queue.submit("c", lambda: ran.append("c"))
        queue.submit("b", lambda: ran.append("b, now urgent"), urgent=True)  # replaces b's work, and passes a
        time.sleep(0.2)
        assert ran == []  # the executor has threads to spare: the one slot holds them back
        release.set()
        wait_until(lambda: len(ran) == 4, timeout=5, what="every key")
        time.sleep(0.2)
        queue.close()
    assert ran == ["new", "b, now urgent", "a", "c"]


def test_no_more_than_slots_run_at_once_and_each_freed_slot_starts_the_next() -> None:
    with ThreadPoolExecutor(max_workers=8) as pool:
        queue, lock, release = WorkQueue(pool, slots=2), threading.Lock(), threading.Event()
        running, most, done = [0], [0], []

        def work(key: int) -> None:
            with lock:
                running[0] += 1
                most[0] = max(most[0], running[0])
            release.wait(5)
            with lock:
                running[0] -= 1
                done.append(key)

        for key in range(6):
            queue.submit(key, lambda key=key: work(key))  # type: ignore[misc]
        wait_until(lambda: running[0] == 2, timeout=5, what="two runs")
        time.sleep(0.2)
        assert running[0] == 2
        release.set()
        wait_until(lambda: len(done) == 6, timeout=5, what="all six")
        queue.close()
    assert most[0] == 2 and sorted(done) == list(range(6))


def job(parallelism: int, suspend: bool = False, **status: object) -> dict[str, object]:
    return {"metadata": {"name": "demo-1"}, "spec": {"parallelism": parallelism, "suspend": suspend}, "status": status}


def test_job_updates_on_the_way_to_a_condition_wait_and_those_that_turn_one_do_not() -> None:
    complete = [{"type": "Complete", "status": "True"}]
    failed = [{"type": "FailureTarget", "status": "True"}]
    waits = [job(2, active=2), job(2, active=2, ready=1), job(1, active=1, ready=0), job(2, succeeded=1)]
    ends = [job(2, succeeded=2, conditions=complete), job(2, failed=1, conditions=failed), job(2, suspend=True)]
    turns = [job(2, active=2, ready=2), job(1, active=1, ready=1), job(2, ready=1, succeeded=1), *ends]
    assert [settles(j) for j in waits] == [False] * len(waits)
    assert [settles(j) for j in turns] == [True] * len(turns)
