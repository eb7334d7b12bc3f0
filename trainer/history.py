"""The run's record in the output URI: ``metrics.jsonl`` (one line per epoch), ``summary.json``, the final
evaluation's ``evaluation.json`` (one entry per evaluated split) and ``predictions-<split>.csv``.

Both are rewritten whole, atomically, after every epoch, so a reader never sees half a line. On resume the
existing ``metrics.jsonl`` is read back and extended; a repeated epoch (after a crash) replaces its line.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from typing import Any

from kiln.storage import StorageError, Store

log = logging.getLogger(__name__)

METRICS, SUMMARY, EVALUATION = "metrics.jsonl", "summary.json", "evaluation.json"
RESTARTED_AT = "restartedAt"  # on the first record of a restarted process: the (fractional) epoch it resumed at


class RunLog:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.records: list[dict[str, Any]] = []
        self.evaluations: dict[str, dict[str, Any]] = {}  # split -> its final evaluation, this process's only
        self.restarted_at: float | None = None

    def load(self) -> None:
        try:
            text = self.store.read_bytes(METRICS).decode()
        except StorageError:
            return
        self.records = [json.loads(line) for line in text.splitlines() if line.strip()]

    def mark_restart(self, epoch: float) -> None:
        """This process resumed a run at ``epoch`` (fractional): its first record says so (curves.png marks it)."""
        self.restarted_at = epoch

    def append(self, record: dict[str, Any]) -> None:
        if self.restarted_at is not None:
            record, self.restarted_at = {**record, RESTARTED_AT: round(self.restarted_at, 4)}, None
        self.records = [r for r in self.records if r.get("epoch") != record.get("epoch")] + [record]
        body = "".join(json.dumps(r) + "\n" for r in self.records)
        self.store.write_bytes(METRICS, body.encode())

    def write_summary(self, summary: dict[str, Any]) -> None:
        self.store.write_bytes(SUMMARY, json.dumps(summary, indent=2).encode())

    def write_evaluation(self, split: str, evaluation: dict[str, Any]) -> str:
        """Add one split's final evaluation to ``evaluation.json`` (rewritten whole, keyed by split)."""
        self.evaluations[split] = evaluation
        self.store.write_bytes(EVALUATION, json.dumps(self.evaluations, indent=2).encode())
        return self.store.url(EVALUATION)

    def write_predictions(self, key: str, rows: list[dict[str, Any]]) -> str:
        buffer = io.StringIO()
        if rows:
            writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        self.store.write_bytes(key, buffer.getvalue().encode())
        return self.store.url(key)

    def url(self, key: str) -> str:
        return self.store.url(key)


class EarlyStopping:
    """Stop after ``patience`` validations without an improvement of at least ``min_delta``."""

    def __init__(self, patience: int, min_delta: float, mode: str) -> None:
        self.patience, self.min_delta, self.mode = patience, min_delta, mode
        self.best: float | None = None
        self.stale = 0

    def observe(self, value: float) -> bool:
        """Record a validation; True when training should stop."""
        improved = self.best is None or (
            value > self.best + self.min_delta if self.mode == "max" else value < self.best - self.min_delta
        )
        if improved:
            self.best, self.stale = value, 0
        else:
            self.stale += 1
        return self.stale >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "stale": self.stale}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.stale = state["best"], state["stale"]
