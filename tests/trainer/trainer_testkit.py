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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import f1_score, jaccard_score, precision_score, recall_score

from kiln.api.manifest import TrainingJob
from kiln.api.resolve import Environment, ResolvedTrainingJob, resolve
from kiln.storage import StorageError, Store, open_store
from kiln.testing.s3 import S3Server

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


YoloLayout = Literal["split-folders", "images-folders"]


def yolo_key(relative: Path, layout: YoloLayout) -> str:
    """The key of a file of the generator's yolo output (``<split>/images/x.png``, ``<split>/labels/x.txt``,
    ``data.yaml``) in one of Ultralytics' two layouts: as written, or ``images/<split>/x.png``,
    ``labels/<split>/x.txt``; data.yaml stays at the top, above the splits, in both."""
    parts = relative.parts
    if layout == "images-folders" and len(parts) > 2:
        parts = (parts[1], parts[0], *parts[2:])
    return "/".join(parts)


def upload_yolo(s3: S3Server, bucket: str, yolo: Path, prefix: str, layout: YoloLayout) -> str:
    """The generator's yolo output under s3://bucket/prefix/ in ``layout``; returns that URI."""
    for path in sorted(p for p in yolo.rglob("*") if p.is_file()):
        s3.client().upload_file(str(path), bucket, f"{prefix}/{yolo_key(path.relative_to(yolo), layout)}")
    return f"s3://{bucket}/{prefix}"


def yolo_split_uri(root: str, split: str, layout: YoloLayout) -> str:
    """Where a split points in ``layout``: the split's folder, or its folder under images/."""
    return f"{root}/{split}" if layout == "split-folders" else f"{root}/images/{split}"


def read_json(store: Store, key: str) -> Any:
    """An object's JSON, or None while it does not exist."""
    try:
        return json.loads(store.read_bytes(key))
    except StorageError:
        return None


def store_metrics_records(run: Store) -> list[dict[str, Any]]:
    return [json.loads(line) for line in run.read_bytes("metrics.jsonl").decode().splitlines() if line.strip()]


StartTrainer = Callable[..., subprocess.Popen[str]]


@dataclass(frozen=True)
class ResumePair:
    """Two torchrun trainings of one spec on S3, ``reference`` left alone and ``resumed`` SIGKILLed after its
    first checkpoint and started again; each with its own node-local cache, so both stage the data from S3."""

    specs: dict[str, Path]
    envs: dict[str, dict[str, str]]
    runs: dict[str, Store]  # each run's output prefix
    checkpoints: Store  # the resumed run's checkpoints

    @classmethod
    def on_s3(cls, tmp_path: Path, jobs: dict[str, ResolvedTrainingJob], s3: S3Server) -> ResumePair:
        for name in jobs:
            (tmp_path / name).mkdir()
        return cls(
            specs={name: write_spec(job, tmp_path / f"{name}.json") for name, job in jobs.items()},
            envs={name: trainer_env(tmp_path / name) for name in jobs},
            runs={name: open_store(job.run_uri, s3.storage()) for name, job in jobs.items()},
            checkpoints=open_store(jobs["resumed"].checkpoint_uri, s3.storage()),
        )

    def start(self, start_trainer: StartTrainer, name: str) -> subprocess.Popen[str]:
        return start_trainer(self.specs[name], self.envs[name], procs=2)

    def kill_after_a_checkpoint(self, start_trainer: StartTrainer, epochs: int, timeout: float) -> dict[str, Any]:
        """Start ``resumed``, SIGKILL it (torchrun and both workers at once: a lost node, nothing gets to save)
        once it has checkpointed an epoch, and return the checkpoint it left: one before the last epoch."""
        first = self.start(start_trainer, "resumed")
        saved = lambda: (read_json(self.checkpoints, "latest.json") or {}).get("epoch", 0) >= 1  # noqa: E731
        wait_for(lambda: saved() or first.poll() is not None, timeout, "a checkpoint")
        assert first.poll() is None, first.communicate()[0]  # still training: it did not fail before saving
        kill_tree(first.pid)
        first.wait()
        killed_at: dict[str, Any] = read_json(self.checkpoints, "latest.json")
        assert 1 <= killed_at["epoch"] < epochs, killed_at  # killed mid-training, after at least one checkpoint
        return killed_at

    def resume(self, start_trainer: StartTrainer, killed_at: dict[str, Any], timeout: float) -> None:
        """Start ``resumed`` again; it must finish, resuming exactly where the checkpoint left it."""
        second = self.start(start_trainer, "resumed")
        output, _ = second.communicate(timeout=timeout)
        assert second.returncode == 0, output
        assert f"resumed at epoch {killed_at['epoch']}, batch 0, step {killed_at['step']}" in output

    def summaries(self) -> dict[str, Any]:
        return {name: read_json(run, "summary.json") for name, run in self.runs.items()}

    def records(self) -> dict[str, list[dict[str, Any]]]:
        return {name: store_metrics_records(run) for name, run in self.runs.items()}


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


def assert_evaluate_reproduces(job: ResolvedTrainingJob, split: str, out: Path) -> dict[str, Any]:
    """``kiln evaluate``'s child process on the finished run's checkpoint root and the split's data gives the numbers
    the run itself wrote for its best checkpoint on that split; the evaluation's own report is returned."""
    from kiln.api.contract import ExitCode
    from kiln.trainer import evaluate  # imports torch: only the tests that train call this

    source = getattr(job.spec.data, split)
    argv = ["--checkpoint", job.checkpoint_uri, "--data", source.uri, "--split", split, "--output", str(out)]
    assert evaluate.main(argv) == ExitCode.OK, (out / "termination-log").read_text()
    mine = json.loads((out / "evaluation.json").read_text())[split]
    own = json.loads((Path(job.run_uri) / "evaluation.json").read_text())[split]
    assert mine["checkpoint"] == own["checkpoint"]
    assert mine["metrics"] == pytest.approx(own["metrics"], rel=1e-6, abs=1e-9)
    assert [c["name"] for c in mine["classes"]] == [c["name"] for c in own["classes"]]
    return mine  # type: ignore[no-any-return]
