"""Detection under torchrun with S3 for data and checkpoints: a SIGKILLed two-process run resumes and ends where
an uninterrupted run with the same seed ends (the segmentation test's method, on a torchvision detector)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from subprocess import Popen

import pytest
from test_segmentation_resume import read_json, s3_metrics_records
from trainer_testkit import kill_tree, make_job, trainer_env, wait_for, write_spec

from kiln.api.resolve import ResolvedTrainingJob
from kiln.storage import open_store
from kiln.testing.s3 import S3Server
from kiln.trainer.detection_shapes import write_detection_shapes

pytestmark = pytest.mark.slow
StartTrainer = Callable[..., Popen[str]]

EPOCHS = 2
STEPS_PER_EPOCH = 2  # 16 training images, 2 processes, batch 4 each


def upload_boxes(s3: S3Server, bucket: str, root: Path) -> str:
    """Generator shapes at 64 px in the yolo layout under s3://bucket/boxes/<split>/. Each split gets its own copy
    of data.yaml: a split is staged from S3 on its own, so the one the generator writes above them would not
    come along."""
    local = write_detection_shapes(root, splits={"train": 16, "val": 6, "test": 6}, size=64, formats=("yolo",))
    yolo = local / "yolo"
    for path in sorted(p for p in yolo.rglob("*") if p.is_file() and p.parent != yolo):
        s3.client().upload_file(str(path), bucket, f"boxes/{path.relative_to(yolo).as_posix()}")
    for split in ("train", "val", "test"):
        s3.client().upload_file(str(yolo / "data.yaml"), bucket, f"boxes/{split}/data.yaml")
    return f"s3://{bucket}/boxes"


def s3_job(tmp_path: Path, data: str, s3: S3Server, bucket: str, name: str) -> ResolvedTrainingJob:
    splits = {split: {"uri": f"{data}/{split}", "format": "yolo"} for split in ("train", "val", "test")}
    return make_job(
        tmp_path, tmp_path, name=name, task="detection", epochs=EPOCHS, optimizer={"name": "sgd", "lr": 0.01},
        model={"architecture": "fasterrcnn_mobilenet_v3_large_320_fpn", "args": {"box_score_thresh": 0.0}},
        data={**splits, "imageSize": 64, "batchSize": 4}, resources={"procsPerNode": 2},
        output={"uri": f"s3://{bucket}/runs/{name}"}, storage={"endpointUrl": s3.endpoint_url},
        checkpoint={"everyEpochs": 1, "keepLast": 2},
    )  # fmt: skip


@pytest.mark.timeout(420)
def test_two_detection_processes_resume_from_s3_after_sigkill_and_match_an_uninterrupted_run(
    tmp_path: Path, s3_server: S3Server, s3_bucket: str, start_trainer: StartTrainer
) -> None:
    data = upload_boxes(s3_server, s3_bucket, tmp_path / "boxes")
    jobs = {name: s3_job(tmp_path, data, s3_server, s3_bucket, name) for name in ("reference", "resumed")}
    specs = {name: write_spec(job, tmp_path / f"{name}.json") for name, job in jobs.items()}
    for name in jobs:
        (tmp_path / name).mkdir()
    envs = {name: trainer_env(tmp_path / name) for name in jobs}
    runs = {name: open_store(job.run_uri, s3_server.storage()) for name, job in jobs.items()}
    checkpoints = open_store(jobs["resumed"].checkpoint_uri, s3_server.storage())

    first = start_trainer(specs["resumed"], envs["resumed"], procs=2)
    saved = lambda: (read_json(checkpoints, "latest.json") or {}).get("epoch", 0) >= 1  # noqa: E731
    wait_for(lambda: saved() or first.poll() is not None, 300, "a checkpoint")
    assert first.poll() is None, first.communicate()[0]  # still training: it did not fail before saving
    kill_tree(first.pid)  # a lost node: torchrun and both workers die at once
    first.wait()
    killed_at = read_json(checkpoints, "latest.json")
    assert 1 <= killed_at["epoch"] < EPOCHS, killed_at
    reference = start_trainer(specs["reference"], envs["reference"], procs=2)  # after the kill: 2 cores suffice
    reference_output, _ = reference.communicate(timeout=300)
    assert reference.returncode == 0, reference_output

    second = start_trainer(specs["resumed"], envs["resumed"], procs=2)
    output, _ = second.communicate(timeout=300)
    assert second.returncode == 0, output
    assert f"resumed at epoch {killed_at['epoch']}, batch 0, step {killed_at['step']}" in output

    summaries = {name: read_json(runs[name], "summary.json") for name in runs}
    assert summaries["resumed"]["state"] == "completed"
    assert summaries["resumed"]["progress"]["step"] == EPOCHS * STEPS_PER_EPOCH
    records = {name: s3_metrics_records(runs[name]) for name in runs}
    assert [r["epoch"] for r in records["resumed"]] == list(range(1, EPOCHS + 1))
    # The detectors' samplers draw from torch's RNG, which the checkpoint restores per rank, and the data is
    # unaugmented: the resumed run retraces the uninterrupted one, as segmentation's does.
    for resumed, uninterrupted in zip(records["resumed"], records["reference"], strict=True):
        for key in ("train/loss", "train/loss/classifier", "val/map", "val/map50"):
            assert resumed[key] == pytest.approx(uninterrupted[key], abs=1e-5), (resumed["epoch"], key)
    evaluations = {name: summaries[name]["evaluation"] for name in runs}
    assert evaluations["resumed"]["split"] == "test"
    assert evaluations["resumed"]["metrics"]["map"] == pytest.approx(
        evaluations["reference"]["metrics"]["map"], abs=1e-5
    )
    assert runs["resumed"].read_bytes("predictions-test.json") and runs["resumed"].read_bytes("gt-test.json")
