"""End to end under torchrun on tiny data: DDP runs, S3, resume after SIGKILL, SIGTERM, kiln run."""

from __future__ import annotations

import csv
import json
import signal
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path
from subprocess import Popen

import pytest
from trainer_testkit import (
    kill_tree,
    latest_pointer,
    make_job,
    metrics_records,
    run_trainer,
    trainer_env,
    wait_for,
    write_spec,
)

from kiln.api.status import CheckpointStatus, Progress
from kiln.storage import open_store
from kiln.testing.processes import free_port
from kiln.testing.s3 import S3Server

pytestmark = pytest.mark.slow
StartTrainer = Callable[..., Popen[str]]


def get(port: int, path: str) -> bytes | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as response:
            return response.read()  # type: ignore[no-any-return]
    except OSError:
        return None


@pytest.mark.timeout(180)
def test_two_processes_train_validate_test_and_predict(tmp_path: Path, tiny_data: Path) -> None:
    job = make_job(
        tmp_path, tiny_data, epochs=3, data={"test": {"uri": str(tiny_data / "test")}}, resources={"procsPerNode": 2},
        ema={"enabled": True, "decay": 0.5}, gradAccumulation=2, gradClip=1.0, augmentation={"mixup": 0.2},
    )  # fmt: skip
    result = run_trainer(write_spec(job, tmp_path / "spec.json"), trainer_env(tmp_path), procs=2)
    assert result.returncode == 0, result.stdout + result.stderr
    run = Path(job.run_uri)
    records = metrics_records(run)
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert {"val/accuracy", "val/top5", "val/precision", "val/recall", "val/f1", "val/loss", "train/loss"} <= set(
        records[-1]
    )
    summary = json.loads((run / "summary.json").read_text())
    assert summary["state"] == "completed" and summary["evaluation"]["split"] == "test"
    assert summary["evaluation"]["metrics"]["accuracy"] >= 0.9
    rows = list(csv.DictReader((run / "predictions-test.csv").open()))
    assert len(rows) == 12 and {"path", "label", "prediction", "confidence"} <= set(rows[0])  # no padded duplicates
    termination = json.loads((tmp_path / "termination-log").read_text())
    assert termination["state"] == "completed"
    Progress.model_validate(termination["progress"])  # exactly the operator's status shapes
    CheckpointStatus.model_validate(termination["checkpoints"])


@pytest.mark.timeout(180)
def test_one_process_with_s3_data_checkpoints_and_outputs(
    tmp_path: Path, tiny_data: Path, s3_server: S3Server, s3_bucket: str, start_trainer: StartTrainer
) -> None:
    data = open_store(f"s3://{s3_bucket}/datasets/tiny", s3_server.storage())
    for path in sorted(tiny_data.rglob("*.png")):
        data.upload_file(str(path.relative_to(tiny_data)), path)
    prefix = f"s3://{s3_bucket}/datasets/tiny"
    job = make_job(
        tmp_path, tiny_data, epochs=2, output={"uri": f"s3://{s3_bucket}/runs/tiny"},
        data={"train": {"uri": f"{prefix}/train"}, "val": {"uri": f"{prefix}/val"}},
        storage={"endpointUrl": s3_server.endpoint_url}, checkpoint={"everySteps": 3},
    )  # fmt: skip
    port = free_port()
    trainer = start_trainer(
        write_spec(job, tmp_path / "spec.json"), trainer_env(tmp_path, KILN_METRICS_PORT=str(port)), procs=1
    )
    wait_for(lambda: get(port, "/progress") is not None or trainer.poll() is not None, 60, "/progress")
    metrics = get(port, "/metrics")
    progress = get(port, "/progress")
    output, _ = trainer.communicate(timeout=120)
    assert trainer.returncode == 0, output
    if metrics is not None and progress is not None:  # the run may finish before the first poll lands
        assert b"kiln_trainer_step_seconds_bucket" in metrics
        assert json.loads(progress)["state"] in ("running", "completed")
    runs = open_store(f"s3://{s3_bucket}/runs/tiny", s3_server.storage())
    keys = {obj.key for obj in runs.list()}
    assert {"metrics.jsonl", "summary.json", "predictions-val.csv", "checkpoints/latest.json"} <= keys
    latest = json.loads(runs.read_bytes("checkpoints/latest.json"))
    assert latest["step"] == 2 * 6  # 48 images / batch 8 = 6 steps per epoch
    assert any(Path(tmp_path / "cache").iterdir())  # staged into the node-local cache


@pytest.mark.timeout(240)
def test_resume_after_sigkill_repeats_no_epoch(tmp_path: Path, tiny_data: Path, start_trainer: StartTrainer) -> None:
    epochs = 8
    job = make_job(tmp_path, tiny_data, epochs=epochs, resources={"procsPerNode": 2}, checkpoint={"keepLast": 3})
    spec = write_spec(job, tmp_path / "spec.json")
    checkpoints = Path(job.spec.checkpoint.uri or "")
    first = start_trainer(spec, trainer_env(tmp_path), procs=2)
    wait_for(lambda: (latest_pointer(checkpoints) or {}).get("epoch", 0) >= 2, 120, "two epochs")
    kill_tree(first.pid)  # a lost node: torchrun and every worker die at once, nothing gets to save
    first.wait()
    killed_at = latest_pointer(checkpoints)
    assert killed_at is not None
    second = start_trainer(spec, trainer_env(tmp_path), procs=2)
    output, _ = second.communicate(timeout=180)
    assert second.returncode == 0, output
    assert f"resumed at epoch {killed_at['epoch']}, batch 0, step {killed_at['step']}" in output
    records = metrics_records(Path(job.run_uri))
    epochs_logged = [r["epoch"] for r in records]
    assert epochs_logged == sorted(set(epochs_logged)) and epochs_logged[-1] == epochs
    steps_per_epoch = 3  # 48 images / 2 ranks / batch 8
    assert json.loads((Path(job.run_uri) / "summary.json").read_text())["progress"]["step"] == epochs * steps_per_epoch


@pytest.mark.timeout(120)
def test_sigterm_checkpoints_and_exits_zero(tmp_path: Path, tiny_data: Path, start_trainer: StartTrainer) -> None:
    job = make_job(tmp_path, tiny_data, epochs=500, checkpoint={"everyEpochs": 1000})
    checkpoints = Path(job.spec.checkpoint.uri or "")
    trainer = start_trainer(write_spec(job, tmp_path / "spec.json"), trainer_env(tmp_path))  # no torchrun
    wait_for((Path(job.run_uri) / "metrics.jsonl").exists, 60, "the first epoch")
    assert latest_pointer(checkpoints) is None
    trainer.send_signal(signal.SIGTERM)
    output, _ = trainer.communicate(timeout=60)
    assert trainer.returncode == 0, output
    pointer = latest_pointer(checkpoints)
    assert pointer is not None and pointer["step"] > 0
    assert json.loads((tmp_path / "termination-log").read_text())["state"] == "preempted"


@pytest.mark.timeout(240)
def test_kiln_run_ctrl_c_checkpoints_and_rerun_resumes(tmp_path: Path, tiny_data: Path, start_trainer: StartTrainer
                                                       ) -> None:  # fmt: skip
    manifest = tmp_path / "job.yaml"
    spec = {
        "task": "classification", "model": {"architecture": "debug"}, "epochs": 5,
        "data": {"train": {"uri": str(tiny_data / "train")}, "val": {"uri": str(tiny_data / "val")},
                 "imageSize": 16, "batchSize": 8, "workers": 1},
        "resources": {"gpusPerNode": 0, "procsPerNode": 2},
    }  # fmt: skip
    manifest.write_text(json.dumps({"apiVersion": "kiln.dev/v1alpha1", "kind": "TrainingJob",
                                    "metadata": {"name": "ctrl-c"}, "spec": spec}))  # fmt: skip
    command = [sys.executable, "-m", "kiln.cli", "run", str(manifest)]
    env = {**trainer_env(tmp_path), "COLUMNS": "200"}
    run = tmp_path / ".kiln" / "local" / "ctrl-c"
    first = start_trainer(manifest, env, command=command, cwd=tmp_path)
    wait_for(lambda: (latest_pointer(run / "checkpoints") or {}).get("epoch", 0) >= 1, 120, "an epoch")
    first.send_signal(signal.SIGINT)  # what Ctrl-C delivers to kiln run
    output, _ = first.communicate(timeout=90)
    assert first.returncode == 0, output
    assert "preempted" in output and "run the same command again to resume" in output
    stopped_at = latest_pointer(run / "checkpoints")
    assert stopped_at is not None
    second = start_trainer(manifest, env, command=command, cwd=tmp_path)
    output, _ = second.communicate(timeout=150)
    assert second.returncode == 0, output
    assert "completed" in output
    records = metrics_records(run)
    assert [r["epoch"] for r in records] == list(range(1, 6))
