"""Checkpointer: pointers, retention, fallback from a corrupt latest, and the same on S3."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from kiln.api.training import CheckpointSpec
from kiln.storage import Store, open_store
from kiln.testing.s3 import S3Server
from kiln.trainer.checkpoint import BEST, LATEST, Checkpointer, entry_name


def checkpointer(store: Store, keep_last: int = 2, keep_best: int = 1, mode: str = "max") -> Checkpointer:
    return Checkpointer(CheckpointSpec(keep_last=keep_last, keep_best=keep_best), store, mode=mode)


def save_series(ckpt: Checkpointer, scores: list[float | None]) -> None:
    for step, score in enumerate(scores, start=1):
        ckpt.save({"step": step, "weights": torch.full((4,), float(step))}, epoch=step, step=step * 10, score=score)


def kept(store: Store) -> list[str]:
    return sorted({obj.key.split("/")[0] for obj in store.list() if "/" in obj.key})


def test_retention_keeps_last_and_best(tmp_path: Path) -> None:
    store = open_store(str(tmp_path))
    ckpt = checkpointer(store, keep_last=2, keep_best=1)
    save_series(ckpt, [0.5, 0.9, 0.6, 0.7, None])
    assert kept(store) == [entry_name(20), entry_name(40), entry_name(50)]  # best (0.9) + last two
    latest = json.loads(store.read_bytes(LATEST))
    assert latest["latest"] == entry_name(50) and latest["step"] == 50
    assert [e["name"] for e in latest["checkpoints"]] == kept(store)
    assert json.loads(store.read_bytes(BEST))["name"] == entry_name(20)


def test_retention_min_mode(tmp_path: Path) -> None:
    store = open_store(str(tmp_path))
    save_series(checkpointer(store, keep_last=1, keep_best=2, mode="min"), [0.3, 0.1, 0.5, 0.2, 0.9])
    assert kept(store) == [entry_name(20), entry_name(40), entry_name(50)]


def test_resume_reads_the_latest(tmp_path: Path) -> None:
    store = open_store(str(tmp_path))
    save_series(checkpointer(store), [0.1, 0.2, 0.3])
    fresh = checkpointer(store)
    state = fresh.load_latest()
    assert state is not None and state["step"] == 3
    assert fresh.latest is not None and fresh.latest.step == 30


def test_corrupt_latest_falls_back_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = open_store(str(tmp_path))
    save_series(checkpointer(store, keep_last=3), [None, None, None])
    newest = tmp_path / entry_name(30) / "state.pt"
    newest.write_bytes(newest.read_bytes()[:100])  # a partial upload
    with caplog.at_level(logging.WARNING):
        state = checkpointer(store, keep_last=3).load_latest()
    assert state is not None and state["step"] == 2
    assert "corrupt or partial" in caplog.text


def test_garbage_pointer_rebuilds_the_index(tmp_path: Path) -> None:
    store = open_store(str(tmp_path))
    save_series(checkpointer(store), [None, None])
    store.write_bytes(LATEST, b"{not json")
    state = checkpointer(store).load_latest()
    assert state is not None and state["step"] == 2


def test_nothing_to_resume(tmp_path: Path) -> None:
    assert checkpointer(open_store(str(tmp_path))).load_latest() is None


def test_s3_round_trip_and_retention(s3_server: S3Server, s3_bucket: str) -> None:
    store = open_store(f"s3://{s3_bucket}/jobs/tiny/checkpoints", s3_server.storage())
    save_series(checkpointer(store, keep_last=1, keep_best=1), [0.9, 0.1, 0.2])
    assert kept(store) == [entry_name(10), entry_name(30)]
    state = checkpointer(store).load_latest()
    assert state is not None and torch.equal(state["weights"], torch.full((4,), 3.0))
    assert checkpointer(store).uri(None) is None
