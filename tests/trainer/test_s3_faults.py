"""S3 that answers 5xx or slowly, through a fault-injecting proxy in front of moto: the trainer retries each
request a bounded number of times, and S3 never holds a torn checkpoint. Each test asserts that no work is
lost beyond one checkpoint interval and that latest.json names a checkpoint whose state.pt loads."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from inprocess import run_main
from trainer_testkit import make_job, store_metrics_records

from kiln.api.contract import ExitCode
from kiln.api.resolve import ResolvedTrainingJob
from kiln.storage import Store, open_store
from kiln.storage.s3 import MAX_ATTEMPTS
from kiln.testing.faulty_proxy import Delay, Fault, FaultyProxy, Rule
from kiln.testing.s3 import S3Server
from kiln.trainer.checkpoint import LATEST, META, STATE, entry_name
from kiln.trainer.history import RESTARTED_AT

pytestmark = pytest.mark.timeout(120)

STEPS_PER_EPOCH = 6  # 48 images / batch 8
ABSORBED = MAX_ATTEMPTS - 1  # failures in a row that one request's retries absorb


@pytest.fixture
def proxy(s3_server: S3Server) -> Iterator[FaultyProxy]:
    with FaultyProxy(s3_server.endpoint_url, []) as running:
        yield running


def tiny_job(root: Path, tiny_data: Path, bucket: str, endpoint_url: str, epochs: int) -> ResolvedTrainingJob:
    return make_job(
        root, tiny_data, epochs=epochs, output={"uri": f"s3://{bucket}/runs/tiny"},
        storage={"endpointUrl": endpoint_url},
    )  # fmt: skip


def load_state(store: Store, name: str) -> dict[str, Any]:
    """A checkpoint's state.pt, checked against the size its meta.json recorded, unpickled."""
    data = store.read_bytes(f"{name}/{STATE}")
    assert len(data) == json.loads(store.read_bytes(f"{name}/{META}"))["size"], name
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)


def assert_no_torn_checkpoint(store: Store) -> dict[str, Any] | None:
    """Every state.pt in S3 loads, and latest.json, if present, names checkpoints that exist; the pointer."""
    for info in store.list():
        if info.key.endswith(f"/{STATE}"):
            load_state(store, info.key.rpartition("/")[0])
    if not store.exists(LATEST):
        return None
    latest: dict[str, Any] = json.loads(store.read_bytes(LATEST))
    for entry in latest["checkpoints"]:
        assert load_state(store, entry["name"])["step"] == entry["step"], entry
    return latest


def describe(proxy: FaultyProxy, rules: list[Rule]) -> str:
    return f"injected {[(type(r).__name__, r.key_pattern, r.injected) for r in rules]}; requests {proxy.requests}"


def test_5xx_and_slow_answers_are_retried_and_the_run_completes(
    isolated: Path, tiny_data: Path, s3_bucket: str, proxy: FaultyProxy
) -> None:
    rules: list[Rule] = [
        Fault(method="PUT", key_pattern=rf"/{STATE}$", status=503, times=ABSORBED),  # the first checkpoint
        Fault(method="PUT", key_pattern=rf"/{LATEST}$", status=500, times=ABSORBED),
        Fault(method="PUT", key_pattern=r"/metrics\.jsonl$", status=503, times=ABSORBED),
        Fault(method="GET", key_pattern=rf"/{STATE}$", status=503, times=1),  # the final evaluation's read
        Delay(method="GET", seconds=0.5, times=3),
    ]
    proxy.rules.extend(rules)
    job = tiny_job(isolated, tiny_data, s3_bucket, proxy.endpoint_url, epochs=3)

    code, message = run_main(isolated, job)

    assert code == ExitCode.OK and message["state"] == "completed", message
    assert all(rule.injected == rule.times for rule in rules), describe(proxy, rules)
    latest = assert_no_torn_checkpoint(open_store(job.checkpoint_uri, job.spec.storage))
    assert latest is not None and latest["latest"] == entry_name(3 * STEPS_PER_EPOCH), latest


@pytest.mark.parametrize("key", [STATE, LATEST])
def test_faults_that_outlast_the_retries_fail_the_run_and_leave_the_previous_checkpoint(
    isolated: Path, tiny_data: Path, s3_bucket: str, s3_server: S3Server, proxy: FaultyProxy, key: str
) -> None:
    # Every save writes state.pt, meta.json, then latest.json: the second epoch's save (the second write of
    # `key`) meets an S3 that answers 503 for good.
    outage = Fault(method="PUT", key_pattern=rf"/{key}$", status=503, skip=1, times=1000)
    proxy.rules.append(outage)
    job = tiny_job(isolated, tiny_data, s3_bucket, proxy.endpoint_url, epochs=3)

    code, message = run_main(isolated, job)

    assert code == ExitCode.FAILED and message["state"] == "failed", message
    reason = message["reason"]
    assert "\n" not in reason and f"/{key}: SlowDown: " in reason, reason
    assert outage.injected == MAX_ATTEMPTS, describe(proxy, [outage])  # retried, and no more than the budget
    checkpoints = open_store(job.checkpoint_uri, job.spec.storage)
    latest = assert_no_torn_checkpoint(checkpoints)
    # The run died saving epoch 2: the pointer still names epoch 1, one checkpoint interval back.
    assert latest is not None and latest["latest"] == entry_name(STEPS_PER_EPOCH), latest

    # With S3 healthy again, a retry (a new pod: a fresh termination log) resumes from that checkpoint.
    (isolated / "termination-log").unlink()
    healthy = tiny_job(isolated, tiny_data, s3_bucket, s3_server.endpoint_url, epochs=3)
    code, message = run_main(isolated, healthy)
    assert code == ExitCode.OK and message["state"] == "completed", message
    latest = assert_no_torn_checkpoint(checkpoints)
    assert latest is not None and latest["latest"] == entry_name(3 * STEPS_PER_EPOCH), latest
    records = store_metrics_records(open_store(job.run_uri, job.spec.storage))
    assert [(r["epoch"], r.get(RESTARTED_AT)) for r in records] == [(1, None), (2, 1.0), (3, None)], records
