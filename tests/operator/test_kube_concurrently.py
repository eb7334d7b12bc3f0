"""Kube.concurrently: independent calls at once, the first on the calling thread, errors after all finished."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from kiln.operator import credentials as creds
from kiln.operator.kube import ApiClient, ApiException, Kube

KUBE = Kube(ApiClient(creds.Credentials(creds.Endpoint("https://unused"), creds.SERVICE_ACCOUNT_DIR), 4), fanout=2)


def test_results_in_order_and_the_first_call_runs_on_the_calling_thread() -> None:
    threads: dict[int, str] = {}

    def call(value: int, delay: float) -> Any:
        def run() -> dict[str, int]:
            threads[value] = threading.current_thread().name
            time.sleep(delay)
            return {"value": value}

        return run

    started = time.monotonic()
    results = KUBE.concurrently(call(1, 0.3), call(2, 0.3), call(3, 0.3))
    assert [r["value"] for r in results] == [1, 2, 3]
    assert time.monotonic() - started < 0.85  # at once, not one after another (0.9 s)
    assert threads[1] == threading.current_thread().name
    assert threads[2].startswith("kiln-kube") and threads[3].startswith("kiln-kube")


def test_an_error_is_raised_only_after_every_call_has_finished() -> None:
    finished = threading.Event()

    def fails() -> dict[str, Any]:
        raise ApiException(409, "Conflict")

    def slow() -> dict[str, Any]:
        time.sleep(0.3)
        finished.set()
        return {}

    for calls in ((fails, slow), (slow, fails)):
        finished.clear()
        with pytest.raises(ApiException, match="Conflict"):
            KUBE.concurrently(*calls)
        assert finished.is_set(), "a retry must never race a call still in flight"
