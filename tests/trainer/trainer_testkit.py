"""Helpers for the trainer tests: tiny image datasets, resolved specs, and trainer subprocesses."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import f1_score, jaccard_score, precision_score, recall_score

from kiln.api.manifest import TrainingJob
from kiln.api.resolve import Environment, ResolvedTrainingJob, resolve

COLORS = ((220, 40, 40), (40, 200, 60), (50, 60, 220))
REPO = Path(__file__).resolve().parents[2]


def write_images(root: Path, per_class: int, *, size: int = 16, seed: int = 0, classes: int = 3) -> Path:
    """An imagefolder split: class k is a noisy patch of COLORS[k], easy to learn in a few steps."""
    rng = np.random.default_rng(seed)
    for label in range(classes):
        folder = root / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            noise = rng.integers(-40, 40, size=(size, size, 3))
            pixels = np.clip(np.array(COLORS[label]) + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{index:03d}.png")
    return root


BASE_SPEC: dict[str, Any] = {
    "task": "classification",
    "model": {"architecture": "debug"},
    "data": {"imageSize": 16, "batchSize": 8, "workers": 0},
    "augmentation": {"preset": "none"},
    "optimizer": {"name": "adamw", "lr": 0.01},
    "scheduler": {"name": "cosine"},
    "epochs": 2,
    "resources": {"gpusPerNode": 0, "procsPerNode": 1},
}


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def make_job(root: Path, dataset: Path, /, name: str = "tiny", **overrides: Any) -> ResolvedTrainingJob:
    splits = {"train": {"uri": str(dataset / "train")}, "val": {"uri": str(dataset / "val")}}
    spec = merge(BASE_SPEC, {"data": splits})
    spec = merge(spec, overrides)
    manifest = {"apiVersion": "kiln.dev/v1alpha1", "kind": "TrainingJob", "metadata": {"name": name}, "spec": spec}
    # Schema only, not parse_manifest's semantic rules: these tests feed the trainer specs it must refuse
    # itself (a pod receives resolved JSON and re-checks names against its own registries).
    job = TrainingJob.model_validate(manifest)
    return resolve(job, Environment(storage_root=str(root / "runs")), mode="local")


def write_spec(job: ResolvedTrainingJob, path: Path) -> Path:
    path.write_text(job.model_dump_json(by_alias=True))
    return path


def trainer_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "KILN_METRICS_PORT": "0",
        "KILN_TERMINATION_LOG": str(tmp_path / "termination-log"),
        "KILN_CACHE_DIR": str(tmp_path / "cache"),
        "OMP_NUM_THREADS": "1",
        **extra,
    }


def trainer_command(spec: Path, procs: int | None) -> list[str]:
    """``python -m kiln.trainer`` alone (procs None) or under torchrun with ``procs`` processes."""
    if procs is None:
        return [sys.executable, "-m", "kiln.trainer", "--spec", str(spec)]
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
        "--nproc-per-node", str(procs), "-m", "kiln.trainer", "--spec", str(spec),
    ]  # fmt: skip


def run_trainer(spec: Path, env: dict[str, str], procs: int | None = None, timeout: float = 150
                ) -> subprocess.CompletedProcess[str]:  # fmt: skip
    return subprocess.run(
        trainer_command(spec, procs), env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False
    )


def wait_for(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


def kill_tree(pid: int) -> None:
    """SIGKILL a process and its direct children (torchrun's workers live in process groups of their own)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    for child in [pid, *map(int, children)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)


def latest_pointer(checkpoints: Path) -> dict[str, Any] | None:
    try:
        return json.loads((checkpoints / "latest.json").read_text())  # type: ignore[no-any-return]
    except (OSError, ValueError):
        return None


def metrics_records(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def assert_per_class_matches_scikit_learn(
    table: list[dict[str, Any]], y_true: np.ndarray, y_pred: np.ndarray, classes: int
) -> None:
    """Each class record (evaluation.json's ``classes``) equals scikit-learn's per-class numbers (zero_division
    0); a class in neither truth nor prediction has None for its scores; support and predicted are counts."""
    labels = list(range(classes))
    f1 = f1_score(y_true, y_pred, labels=labels, average=None, zero_division=0)
    reference = {
        "iou": jaccard_score(y_true, y_pred, labels=labels, average=None, zero_division=0),
        "dice": f1,
        "f1": f1,
        "precision": precision_score(y_true, y_pred, labels=labels, average=None, zero_division=0),
        "recall": recall_score(y_true, y_pred, labels=labels, average=None, zero_division=0),
    }
    assert [row["index"] for row in table] == labels
    for k, row in enumerate(table):
        present = bool((y_true == k).any() or (y_pred == k).any())
        assert set(row) & set(reference), row
        for name in set(row) & set(reference):
            expected = pytest.approx(reference[name][k], abs=1e-6) if present else None
            assert row[name] == expected, (k, name)
        assert (row["support"], row["predicted"]) == (int((y_true == k).sum()), int((y_pred == k).sum()))
