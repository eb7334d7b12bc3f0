"""Detection under torchrun with S3 for data and checkpoints: a SIGKILLed two-process run resumes and ends where
an uninterrupted run with the same seed ends (the segmentation test's method, on a torchvision detector)."""

from __future__ import annotations

from pathlib import Path

import pytest
from trainer_testkit import ResumePair, StartTrainer, YoloLayout, make_job, upload_yolo, yolo_split_uri

from kiln.api.resolve import ResolvedTrainingJob
from kiln.testing.s3 import S3Server
from kiln.trainer.detection_shapes import write_detection_shapes

pytestmark = pytest.mark.slow

EPOCHS = 2
STEPS_PER_EPOCH = 2  # 16 training images, 2 processes, batch 4 each
LAYOUT: YoloLayout = "images-folders"
SPLITS = ("train", "val", "test")
# box_score_thresh 0: every detection counts, so a barely trained network still has predictions to score. 64 sampled
# boxes per image instead of 512 cut the box head's training step several times; the test is about resuming.
DETECTOR = {
    "architecture": "fasterrcnn_mobilenet_v3_large_320_fpn",
    "args": {"box_score_thresh": 0.0, "box_batch_size_per_image": 64},
}


def upload_boxes(s3: S3Server, bucket: str, root: Path) -> str:
    """Generator shapes at 64 px in Ultralytics' images/<split> layout under s3://bucket/boxes/: labels/<split>
    beside images/<split> and data.yaml above both, so staging brings what lies outside the split's prefix."""
    local = write_detection_shapes(root, splits={"train": 16, "val": 6, "test": 6}, size=64, formats=("yolo",))
    return upload_yolo(s3, bucket, local / "yolo", "boxes", LAYOUT)


def s3_job(tmp_path: Path, data: str, s3: S3Server, bucket: str, name: str) -> ResolvedTrainingJob:
    splits = {
        split: {"uri": yolo_split_uri(data, split, LAYOUT), "format": "yolo"} for split in ("train", "val", "test")
    }
    return make_job(
        tmp_path, tmp_path, name=name, task="detection", epochs=EPOCHS, optimizer={"name": "sgd", "lr": 0.01},
        model=DETECTOR,
        data={**splits, "imageSize": 64, "batchSize": 4}, resources={"procsPerNode": 2},
        output={"uri": f"s3://{bucket}/runs/{name}"}, storage={"endpointUrl": s3.endpoint_url},
        checkpoint={"everyEpochs": 1, "keepLast": 2},
    )  # fmt: skip


# Hang guards, not timing assertions: on a quiet 2-core machine the test takes a few minutes; shared with a load
# average of 20 (other engineers' runs), the three trainings took more than 420 s.
@pytest.mark.timeout(1200)
def test_two_detection_processes_resume_from_s3_after_sigkill_and_match_an_uninterrupted_run(
    tmp_path: Path, s3_server: S3Server, s3_bucket: str, start_trainer: StartTrainer
) -> None:
    data = upload_boxes(s3_server, s3_bucket, tmp_path / "boxes")
    jobs = {name: s3_job(tmp_path, data, s3_server, s3_bucket, name) for name in ("reference", "resumed")}
    pair = ResumePair.on_s3(tmp_path, jobs, s3_server)
    # The reference alongside, as segmentation's test runs it: on a shared machine four processes get a larger share
    # of it than two, and the first run stays killable after its first checkpoint either way.
    reference = pair.start(start_trainer, "reference")
    killed_at = pair.kill_after_a_checkpoint(start_trainer, EPOCHS, timeout=600)
    pair.resume(start_trainer, killed_at, timeout=600)
    reference_output, _ = reference.communicate(timeout=600)
    assert reference.returncode == 0, reference_output

    summaries = pair.summaries()
    assert summaries["resumed"]["state"] == "completed"
    assert summaries["resumed"]["progress"]["step"] == EPOCHS * STEPS_PER_EPOCH
    records = pair.records()
    assert [r["epoch"] for r in records["resumed"]] == list(range(1, EPOCHS + 1))
    # The detectors' samplers draw from torch's RNG, which the checkpoint restores per rank, and the data is
    # unaugmented: the resumed run retraces the uninterrupted one, as segmentation's does.
    for resumed, uninterrupted in zip(records["resumed"], records["reference"], strict=True):
        for key in ("train/loss", "train/loss/classifier", "val/map", "val/map50"):
            assert resumed[key] == pytest.approx(uninterrupted[key], abs=1e-5), (resumed["epoch"], key)
    evaluations = {name: summaries[name]["evaluation"] for name in summaries}
    assert evaluations["resumed"]["split"] == "test"
    assert evaluations["resumed"]["metrics"]["map"] == pytest.approx(
        evaluations["reference"]["metrics"]["map"], abs=1e-5
    )
    resumed_run = pair.runs["resumed"]
    assert resumed_run.read_bytes("predictions-test.json") and resumed_run.read_bytes("gt-test.json")
