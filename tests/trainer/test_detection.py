"""Detection end to end in one process: every listed torchvision detector builds, model.args reach it, the loss
dict is logged term by term, and a short run leaves COCO JSON files from which pycocotools recomputes Kiln's mAP,
plus evaluation.json per class and pictures of the first images."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from inprocess import CPU, run_main, summary
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from trainer_testkit import assert_evaluate_reproduces, make_job, metrics_records

from kiln.api.resolve import ResolvedTrainingJob
from kiln.trainer.detection_shapes import write_detection_shapes
from kiln.trainer.errors import InvalidInput
from kiln.trainer.tasks.detection_model import DETECTORS, build_detector
from kiln.trainer.trainer import Trainer

SMALL = "fasterrcnn_mobilenet_v3_large_320_fpn"


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The generator's dataset at 64 px: enough images for one short epoch and a val and test split."""
    root = tmp_path_factory.mktemp("detection-shapes")
    return write_detection_shapes(root, splits={"train": 16, "val": 8, "test": 8}, size=64, formats=("coco",)) / "coco"


def detection_job(tmp_path: Path, shapes: Path, **overrides: Any) -> ResolvedTrainingJob:
    splits = {split: {"uri": str(shapes / split), "format": "coco"} for split in ("train", "val", "test")}
    spec = {
        "task": "detection", "model": {"architecture": SMALL}, "epochs": 1, "optimizer": {"name": "sgd", "lr": 0.01},
        "data": {**splits, "imageSize": 64, "batchSize": 4}, "scheduler": {"name": "none"},
    }  # fmt: skip
    return make_job(tmp_path, shapes, **{**spec, **overrides})


@pytest.mark.parametrize("architecture", DETECTORS.names())
def test_every_listed_detector_builds_for_the_classes_plus_background(
    tmp_path: Path, shapes: Path, architecture: str
) -> None:
    job = detection_job(tmp_path, shapes, model={"architecture": architecture})
    model = build_detector(job, num_classes=3)
    transform = model.transform  # type: ignore[attr-defined]
    if DETECTORS.get(architecture).sized:  # resized to data.imageSize, not torchvision's 800 px
        assert transform.min_size == (64,) and transform.max_size == 64
    outputs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)]
    widths = {m.out_features if isinstance(m, torch.nn.Linear) else m.out_channels for m in outputs}
    assert 4 in widths or any(w % 4 == 0 for w in widths)  # some head predicts 3 classes + background


def test_model_args_reach_the_builder_and_reserved_ones_are_refused(tmp_path: Path, shapes: Path) -> None:
    args = {"box_score_thresh": 0.2, "min_size": 96, "box_detections_per_img": 7}
    job = detection_job(tmp_path, shapes, model={"architecture": SMALL, "args": args})
    model = build_detector(job, num_classes=3)
    assert model.roi_heads.score_thresh == 0.2 and model.roi_heads.detections_per_img == 7  # type: ignore[union-attr]
    assert model.transform.min_size == (96,)  # type: ignore[union-attr]
    for key in ("num_classes", "weights", "weights_backbone"):
        reserved = detection_job(tmp_path, shapes, model={"architecture": SMALL, "args": {key: 1}})
        with pytest.raises(InvalidInput, match=rf"model\.args\.{key}: set by model"):
            build_detector(reserved, num_classes=3)
    typo = detection_job(tmp_path, shapes, model={"architecture": SMALL, "args": {"box_score_tresh": 0.2}})
    with pytest.raises(InvalidInput, match=r"model\.args\.box_score_tresh: unknown .* did you mean box_score_thresh"):
        build_detector(typo, num_classes=3)


def test_the_loss_terms_are_the_detectors_own(tmp_path: Path, shapes: Path) -> None:
    trainer = Trainer(detection_job(tmp_path, shapes), CPU)
    batch = trainer.to_device(next(iter(trainer.c.train_loader)))
    assert isinstance(batch["image"], list) and len(batch["image"]) == 4
    outputs = trainer.c.objective.forward(trainer.c.model, batch, training=True)
    loss = trainer.c.objective.loss(outputs, batch)
    terms = trainer.c.objective.loss_terms()
    assert set(terms) == {"classifier", "box_reg", "objectness", "rpn_box_reg"}
    assert loss.item() == pytest.approx(sum(v.item() for v in terms.values()), rel=1e-6)


def _cocoeval_stats(gt: Path, predictions: Path) -> list[float]:
    with contextlib.redirect_stdout(io.StringIO()):
        truth = COCO(str(gt))
        rows = json.loads(predictions.read_text())
        evaluation = COCOeval(truth, truth.loadRes(rows) if rows else COCO(), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return [float(v) for v in evaluation.stats]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_short_run_writes_coco_files_pycocotools_agrees_with(isolated: Path, shapes: Path) -> None:
    # box_score_thresh 0: every detection counts, so even a barely trained network leaves predictions to score. 64
    # sampled boxes per image instead of 512 make the training steps several times cheaper (the box head's cost).
    args = {"box_score_thresh": 0.0, "box_batch_size_per_image": 64}
    job = detection_job(isolated, shapes, model={"architecture": SMALL, "args": args})
    code, message = run_main(isolated, job)
    assert code == 0, message
    run = Path(job.run_uri)
    record = metrics_records(run)[-1]
    for term in ("classifier", "box_reg", "objectness", "rpn_box_reg"):
        assert record[f"train/loss/{term}"] > 0
    assert {"val/map", "val/map50", "val/map75", "val/mar_100"} <= record.keys()
    final = summary(job)["evaluation"]
    assert final["split"] == "test"
    for split in ("val", "test"):
        gt = json.loads((run / f"gt-{split}.json").read_text())
        assert [c["name"] for c in gt["categories"]] == ["circle", "square", "triangle"]
        predictions = json.loads((run / f"predictions-{split}.json").read_text())
        assert predictions and set(predictions[0]) == {"image_id", "category_id", "bbox", "score"}
        stats = _cocoeval_stats(run / f"gt-{split}.json", run / f"predictions-{split}.json")
        evaluation = json.loads((run / "evaluation.json").read_text())[split]
        metrics = evaluation["metrics"]
        for position, name in ((0, "map"), (1, "map50"), (2, "map75"), (8, "mar_100")):
            assert metrics[name] == pytest.approx(max(stats[position], 0.0), abs=1e-4), (split, name)
        assert [c["name"] for c in evaluation["classes"]] == ["circle", "square", "triangle"]
        pictures = sorted((run / "samples" / split).rglob("*.png"))
        assert len(pictures) == 8, pictures
    assert summary(job)["predictions"].endswith("predictions-test.json")
    # `kiln evaluate` of the run's checkpoint on its test data: the same numbers, COCO files pycocotools reads.
    out = isolated / "evaluated"
    mine = assert_evaluate_reproduces(job, "test", out)
    stats = _cocoeval_stats(out / "gt-test.json", out / "predictions-test.json")
    assert mine["metrics"]["map50"] == pytest.approx(max(stats[1], 0.0), abs=1e-4)
    assert len(sorted((out / "samples" / "test").rglob("*.png"))) == 8
