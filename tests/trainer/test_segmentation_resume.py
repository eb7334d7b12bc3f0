"""Segmentation under torchrun with S3 for data and checkpoints: a SIGKILLed run resumes and ends where an
uninterrupted run with the same seed ends."""

from __future__ import annotations

from pathlib import Path

import pytest
from trainer_testkit import ResumePair, StartTrainer, make_job, read_json

from kiln.api.resolve import ResolvedTrainingJob
from kiln.testing.s3 import S3Server
from kiln.trainer.shapes import write_shapes

pytestmark = pytest.mark.slow

EPOCHS = 4
FOLDER = {"format": "segmentation-folder"}
# A network small enough to train in seconds on a CPU core (3 M parameters).
TINY = {"architecture": "unet", "encoder": "tu-tf_mobilenetv3_small_minimal_100", "numClasses": 4}


def upload_shapes(s3: S3Server, bucket: str, root: Path) -> str:
    """Tiny shapes splits (32 px) under s3://bucket/shapes/<split>/{images,masks}/."""
    local = write_shapes(root, splits={"train": 32, "val": 8, "test": 8}, size=32)
    for path in sorted(local.rglob("*.png")):
        s3.client().upload_file(str(path), bucket, f"shapes/{path.relative_to(local).as_posix()}")
    return f"s3://{bucket}/shapes"


def s3_job(tmp_path: Path, data: str, s3: S3Server, bucket: str, name: str) -> ResolvedTrainingJob:
    """Two processes, batch 4 each: 4 steps per epoch; a checkpoint in S3 after every epoch."""
    splits = {split: {"uri": f"{data}/{split}", **FOLDER} for split in ("train", "val", "test")}
    return make_job(
        tmp_path, tmp_path, name=name, task="segmentation", model=TINY, epochs=EPOCHS, optimizer={"lr": 0.01},
        data={**splits, "imageSize": 32, "batchSize": 4}, resources={"procsPerNode": 2},
        output={"uri": f"s3://{bucket}/runs/{name}"}, storage={"endpointUrl": s3.endpoint_url},
        checkpoint={"everyEpochs": 1, "keepLast": 2},
    )  # fmt: skip


@pytest.mark.timeout(300)
def test_two_processes_resume_from_s3_after_sigkill_and_match_an_uninterrupted_run(
    tmp_path: Path, s3_server: S3Server, s3_bucket: str, start_trainer: StartTrainer
) -> None:
    data = upload_shapes(s3_server, s3_bucket, tmp_path / "shapes")
    jobs = {name: s3_job(tmp_path, data, s3_server, s3_bucket, name) for name in ("reference", "resumed")}
    pair = ResumePair.on_s3(tmp_path, jobs, s3_server)
    reference = pair.start(start_trainer, "reference")  # alongside, on the same data
    killed_at = pair.kill_after_a_checkpoint(start_trainer, EPOCHS, timeout=150)
    assert read_json(pair.runs["resumed"], "summary.json")["state"] == "running"
    pair.resume(start_trainer, killed_at, timeout=150)
    reference_output, _ = reference.communicate(timeout=150)
    assert reference.returncode == 0, reference_output

    resumed_summary, reference_summary = (pair.summaries()[name] for name in ("resumed", "reference"))
    assert resumed_summary["state"] == "completed" and resumed_summary["progress"]["step"] == EPOCHS * 4
    records = pair.records()
    assert [r["epoch"] for r in records["resumed"]] == list(range(1, EPOCHS + 1))  # none repeated, none lost
    # On CPU with one thread per rank, a resumed run is the uninterrupted run: the same weights, optimizer and
    # schedule state and RNG states from the checkpoint, the same per-epoch shuffle, a deterministic gloo sum of
    # two gradients and unaugmented data. So its numbers match the reference's to 1e-6 (they came out identical),
    # a far tighter bound than the seed-to-seed noise a looser tolerance would have to allow.
    for resumed, uninterrupted in zip(records["resumed"], records["reference"], strict=True):
        for key in ("train/loss", "val/loss", "val/miou"):
            assert resumed[key] == pytest.approx(uninterrupted[key], abs=1e-6), (resumed["epoch"], key)
    test_miou = resumed_summary["evaluation"]["metrics"]["miou"]
    assert resumed_summary["evaluation"]["split"] == "test"
    assert test_miou == pytest.approx(reference_summary["evaluation"]["metrics"]["miou"], abs=1e-6)
