"""Kiln's detection metrics are COCOeval's: the same predictions and ground truth, written as the COCO JSON files a
run leaves behind and scored by pycocotools directly, give the same numbers to 1e-4."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from kiln.trainer.tasks.detection import term_name
from kiln.trainer.tasks.detection_metrics import DetectionMetrics
from kiln.trainer.tasks.detection_model import from_detections, to_targets
from kiln.trainer.tasks.detection_outputs import result_rows, sample_png

CLASSES = ("circle", "square", "triangle")


def _scene(seed: int, images: int = 24) -> tuple[list[dict[str, torch.Tensor]], list[dict[str, torch.Tensor]]]:
    """Ground truth (some images without boxes, sizes from small to large) and noisy detections of it: boxes
    jittered, some missed, some false, labels sometimes wrong, scores correlated with quality."""
    rng = np.random.default_rng(seed)
    truths, predictions = [], []
    for image in range(images):
        count = 0 if image % 7 == 3 else int(rng.integers(1, 5))
        xy = rng.uniform(0, 150, size=(count, 2))
        wh = rng.uniform(4, 110, size=(count, 2))
        boxes = np.concatenate([xy, xy + wh], axis=1).astype(np.float32)
        labels = rng.integers(0, len(CLASSES), size=count)
        truths.append({"boxes": torch.from_numpy(boxes), "labels": torch.from_numpy(labels)})
        keep = rng.random(count) > 0.15
        noise = rng.normal(0, 6, size=(int(keep.sum()), 4)).astype(np.float32)
        pred_boxes = boxes[keep] + noise
        pred_labels = np.where(rng.random(int(keep.sum())) < 0.85, labels[keep], rng.integers(0, len(CLASSES)))
        false = int(rng.integers(0, 3))
        false_xy = rng.uniform(0, 150, size=(false, 2))
        false_boxes = np.concatenate([false_xy, false_xy + rng.uniform(5, 60, size=(false, 2))], axis=1)
        all_boxes = np.concatenate([pred_boxes, false_boxes]).astype(np.float32)
        all_boxes[:, 2:] = np.maximum(all_boxes[:, 2:], all_boxes[:, :2] + 1)
        scores = np.concatenate([rng.uniform(0.4, 1.0, size=len(pred_boxes)), rng.uniform(0.0, 0.6, size=false)])
        predictions.append(
            {
                "boxes": torch.from_numpy(all_boxes),
                "scores": torch.from_numpy(scores.astype(np.float32)),
                "labels": torch.from_numpy(np.concatenate([pred_labels, rng.integers(0, 3, size=false)])),
            }
        )
    return truths, predictions


def _coco_ground_truth(truths: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
    """The ground-truth layout the data layer's coco_ground_truth() writes: image id = index + 1, category id =
    class index + 1, bbox [x, y, w, h], area w * h."""
    images, annotations = [], []
    for index, truth in enumerate(truths):
        images.append({"id": index + 1, "file_name": f"{index}.png", "height": 300, "width": 300})
        for box, label in zip(truth["boxes"].tolist(), truth["labels"].tolist(), strict=True):
            x1, y1, x2, y2 = box
            annotations.append(
                {"id": len(annotations) + 1, "image_id": index + 1, "category_id": label + 1,
                 "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0}
            )  # fmt: skip
    categories = [{"id": k + 1, "name": name} for k, name in enumerate(CLASSES)]
    return {"images": images, "annotations": annotations, "categories": categories}


def _cocoeval(tmp_path: Path, truths: list[dict[str, torch.Tensor]], rows: list[dict[str, Any]]) -> COCOeval:
    gt_path, dt_path = tmp_path / "gt.json", tmp_path / "predictions.json"
    gt_path.write_text(json.dumps(_coco_ground_truth(truths)))
    dt_path.write_text(json.dumps(rows))
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_path))
        evaluation = COCOeval(gt, gt.loadRes(str(dt_path)), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return evaluation


@pytest.mark.parametrize("seed", [0, 1])
def test_kiln_map_equals_pycocotools_cocoeval(tmp_path: Path, seed: int) -> None:
    truths, predictions = _scene(seed)
    metrics = DetectionMetrics(CLASSES)
    for start in range(0, len(truths), 5):  # in batches, as evaluation feeds it
        metrics.update(predictions[start : start + 5], truths[start : start + 5])
    kiln = metrics.compute()
    rows = [
        row
        for index, p in enumerate(predictions)
        for row in result_rows(index + 1, p["boxes"].numpy(), p["scores"].numpy(), p["labels"].numpy())
    ]
    stats = _cocoeval(tmp_path, truths, rows).stats
    # COCOeval's summary order: AP, AP50, AP75, AP small/medium/large, AR@1, AR@10, AR@100, ...
    names = ("map", "map50", "map75", "map_small", "map_medium", "map_large", "mar_1", "mar_10", "mar_100")
    for position, name in enumerate(names):
        assert kiln[name] == pytest.approx(max(stats[position], 0.0), abs=1e-4), name
    assert 0.2 < kiln["map50"] < 1.0  # a scene that tells right from wrong: neither perfect nor empty


def test_per_class_ap_equals_cocoeval_per_category(tmp_path: Path) -> None:
    truths, predictions = _scene(2)
    metrics = DetectionMetrics(CLASSES)
    metrics.update(predictions, truths)
    table = metrics.details()["classes"]
    rows = [
        row
        for index, p in enumerate(predictions)
        for row in result_rows(index + 1, p["boxes"].numpy(), p["scores"].numpy(), p["labels"].numpy())
    ]
    evaluation = _cocoeval(tmp_path, truths, rows)
    precision = evaluation.eval["precision"]  # [T, R, K, A, M]
    for k, record in enumerate(table):
        assert record["name"] == CLASSES[k]
        per_class = precision[:, :, k, 0, -1]
        assert record["ap"] == pytest.approx(per_class[per_class > -1].mean(), abs=1e-4)
        at50 = precision[0, :, k, 0, -1]
        assert record["ap50"] == pytest.approx(at50[at50 > -1].mean(), abs=1e-4)
        assert record["boxes"] == sum(int((t["labels"] == k).sum()) for t in truths)
        assert set(record["precisionAt50"]) == {"0.1", "0.2", "0.3", "0.4", "0.5", "0.6", "0.7", "0.8", "0.9", "1.0"}


def test_a_class_without_ground_truth_has_no_scores() -> None:
    metrics = DetectionMetrics(CLASSES)
    truth = {"boxes": torch.tensor([[10.0, 10.0, 50.0, 50.0]]), "labels": torch.tensor([0])}
    prediction = {
        "boxes": torch.tensor([[10.0, 10.0, 50.0, 50.0], [60.0, 60.0, 90.0, 90.0]]),
        "scores": torch.tensor([0.9, 0.8]),
        "labels": torch.tensor([0, 2]),
    }
    metrics.update([prediction], [truth])
    assert metrics.compute()["map"] == pytest.approx(1.0)
    table = metrics.details()["classes"]
    assert table[0]["ap"] == pytest.approx(1.0)
    assert table[1]["ap"] is None and table[2]["ap"] is None


def test_labels_shift_past_the_background_and_back() -> None:
    targets = to_targets([torch.zeros(1, 4)], [torch.tensor([0])])
    assert targets[0]["labels"].tolist() == [1]  # class 0 is torchvision's label 1; 0 is the background
    detections = [
        {"boxes": torch.ones(3, 4), "scores": torch.tensor([0.9, 0.8, 0.7]), "labels": torch.tensor([0, 1, 3])}
    ]
    (out,) = from_detections(detections)
    assert out["labels"].tolist() == [0, 2]  # the background detection is dropped
    assert out["scores"].tolist() == pytest.approx([0.8, 0.7])


def test_loss_terms_are_named_without_the_prefix() -> None:
    assert [term_name(k) for k in ("loss_classifier", "loss_box_reg", "loss_objectness", "bbox_regression")] == [
        "classifier", "box_reg", "objectness", "bbox_regression",
    ]  # fmt: skip


def test_sample_picture_has_both_panels() -> None:
    image = np.zeros((64, 96, 3), dtype=np.uint8)
    truth = (np.array([[4.0, 4.0, 40.0, 30.0]], dtype=np.float32), np.array([1]))
    predicted = (np.array([[5.0, 5.0, 41.0, 31.0]], dtype=np.float32), np.array([0.9], dtype=np.float32), np.array([1]))
    from PIL import Image

    picture = Image.open(io.BytesIO(sample_png(image, truth, predicted, CLASSES)))
    assert picture.size == (2 * 576, 384)  # enlarged to 384 px on the shorter side, truth | prediction
    pixels = np.asarray(picture)
    assert pixels[:, :576].any() and pixels[:, 576:].any()  # boxes drawn on both panels
