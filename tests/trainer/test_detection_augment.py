"""Bbox-aware detection pipelines (boxes follow flips and crops, checked against coordinates worked out by hand
and against where the drawn pixels land) and the synthetic detection dataset's generator."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from kiln.api.data import AugmentationSpec, Transform
from kiln.trainer import detection_shapes
from kiln.trainer.augment import DETECTION_PRESETS, PRESETS, detection_eval_pipeline, detection_train_pipeline
from kiln.trainer.errors import InvalidInput

WHITE_BOX = (10, 5, 30, 25)  # x1, y1, x2, y2 of the white rectangle in the 40x80 test image
GREY_BOX = (30, 30, 50, 40)
FAR_BOX = (65, 10, 75, 20)


def picture() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A black 40x80 (HxW) image with a white and a grey rectangle, and three boxes (one on neither)."""
    image = np.zeros((40, 80, 3), np.uint8)
    x1, y1, x2, y2 = WHITE_BOX
    image[y1:y2, x1:x2] = 255
    x1, y1, x2, y2 = GREY_BOX
    image[y1:y2, x1:x2] = 100
    return image, np.array([WHITE_BOX, GREY_BOX, FAR_BOX], np.float32), np.array([0, 1, 2], np.int64)


def explicit(*transforms: Transform) -> AugmentationSpec:
    return AugmentationSpec(transforms=list(transforms))


def white_extent(image: torch.Tensor) -> list[int]:
    """Where the white rectangle's pixels ended up: [x1, y1, x2, y2), from the pixels alone."""
    ys, xs = np.nonzero(image[0].numpy() > 0.7)
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def test_flip_moves_boxes_with_the_pixels() -> None:
    image, boxes, labels = picture()
    pipeline = detection_train_pipeline(explicit(Transform(name="HorizontalFlip", args={"p": 1.0})), 80)
    out = pipeline(image=image, bboxes=boxes, labels=labels)
    # x -> 80 - x, corners swapped; y unchanged; 80 px wide already, so no resize; padded below to 80x80.
    expected = [[50, 5, 70, 25], [30, 30, 50, 40], [5, 10, 15, 20]]
    np.testing.assert_allclose(out["bboxes"], expected, atol=1e-4)
    assert np.asarray(out["labels"]).tolist() == [0, 1, 2]
    assert tuple(out["image"].shape) == (3, 80, 80) and out["image"].dtype == torch.float32
    assert white_extent(out["image"]) == expected[0]
    assert float(out["image"][:, 40:].abs().sum()) == 0  # the padding is zeros, at the bottom


def test_crop_clips_drops_and_rescales_boxes() -> None:
    image, boxes, labels = picture()
    crop = Transform(name="Crop", args={"x_min": 20, "y_min": 0, "x_max": 60, "y_max": 40})
    out = detection_train_pipeline(explicit(crop), 80)(image=image, bboxes=boxes, labels=labels)
    # The 40x40 crop starts at x 20 and is then resized 2x: the white box loses its left half (visible 0.5, kept),
    # the grey one moves, the far one is outside the crop and goes.
    expected = [[0, 10, 20, 50], [20, 60, 60, 80]]
    np.testing.assert_allclose(out["bboxes"], expected, atol=1e-4)
    assert np.asarray(out["labels"]).tolist() == [0, 1]
    assert white_extent(out["image"]) == expected[0]


def test_eval_pipeline_keeps_aspect_and_pads_bottom_right() -> None:
    image, boxes, labels = picture()
    out = detection_eval_pipeline(40)(image=image, bboxes=boxes, labels=labels)
    # 40x80 -> 20x40 (half), padded to 40x40.
    np.testing.assert_allclose(out["bboxes"], np.array([WHITE_BOX, GREY_BOX, FAR_BOX]) / 2, atol=1e-4)
    assert tuple(out["image"].shape) == (3, 40, 40)
    assert float(out["image"][:, 20:].abs().sum()) == 0
    assert float(out["image"].max()) == 1.0  # scaled to 0..1, not normalized


@pytest.mark.parametrize("preset", DETECTION_PRESETS.names())
def test_presets_keep_boxes_valid(preset: str) -> None:
    pipeline = detection_train_pipeline(AugmentationSpec(preset=preset), 48)  # type: ignore[arg-type]
    image, boxes, labels = picture()
    for _ in range(12):
        out = pipeline(image=image, bboxes=boxes, labels=labels)
        got = np.asarray(out["bboxes"]).reshape(-1, 4)
        assert tuple(out["image"].shape) == (3, 48, 48)
        assert ((got >= 0) & (got <= 48)).all() and (got[:, 2:] > got[:, :2]).all()
        assert set(np.asarray(out["labels"]).tolist()) <= {0, 1, 2}
    empty = pipeline(image=image, bboxes=np.zeros((0, 4), np.float32), labels=np.zeros(0, np.int64))
    assert np.asarray(empty["bboxes"]).reshape(-1, 4).shape == (0, 4)


def test_detection_presets_answer_to_the_api_names() -> None:
    assert DETECTION_PRESETS.names() == PRESETS.names()  # augmentation.preset is one list for every task


def test_transforms_that_cannot_move_boxes_are_refused() -> None:
    spec = explicit(Transform(name="HorizontalFlip"), Transform(name="CenterCrop3D", args={"size": [2, 2, 2]}))
    with pytest.raises(InvalidInput, match=r"augmentation\.transforms\[1\]: CenterCrop3D cannot move bounding boxes"):
        detection_train_pipeline(spec, 32)
    with pytest.raises(InvalidInput, match=r"augmentation\.transforms\[0\]: Affine"):
        detection_train_pipeline(explicit(Transform(name="Affine", args={"zoom": 2})), 32)


def files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_generator_is_deterministic(tmp_path: Path) -> None:
    splits = {"train": 8, "val": 3, "test": 2}
    first = files(detection_shapes.write_detection_shapes(tmp_path / "a", splits=splits, size=48, seed=5))
    second = files(detection_shapes.write_detection_shapes(tmp_path / "b", splits=splits, size=48, seed=5))
    assert first == second
    other = files(detection_shapes.write_detection_shapes(tmp_path / "c", splits=splits, size=48, seed=6))
    assert other["coco/train/annotations.json"] != first["coco/train/annotations.json"]
    assert {"coco/val/images/0002.png", "yolo/test/images/0001.png", "yolo/data.yaml"} <= first.keys()


def test_generator_draws_every_class_some_small_and_some_negatives(tmp_path: Path) -> None:
    root = detection_shapes.write_detection_shapes(tmp_path, splits={"train": 60}, size=128, formats=("coco",))
    assert not (tmp_path / "yolo").exists()
    document = json.loads((root / "coco/train/annotations.json").read_text())
    assert [c["name"] for c in document["categories"]] == ["circle", "square", "triangle"]
    per_image = {image["id"]: 0 for image in document["images"]}
    for annotation in document["annotations"]:
        per_image[annotation["image_id"]] += 1
        x, y, w, h = annotation["bbox"]
        assert 0 <= x < x + w <= 128 and 0 <= y < y + h <= 128
    assert {a["category_id"] for a in document["annotations"]} == {1, 2, 3}
    assert 1 <= sum(count == 0 for count in per_image.values()) <= 15  # about 10% negatives
    assert min(max(a["bbox"][2:]) for a in document["annotations"]) <= 16  # some objects are small


def test_generator_cli_writes_yolo_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [str(tmp_path), "--format", "yolo", "--train", "4", "--val", "2", "--test", "0", "--size", "32"]
    assert detection_shapes.main(argv) == 0
    assert "6 images" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == [".complete", "yolo"]
    assert "names:\n- circle\n- square\n- triangle\n" in (tmp_path / "yolo/data.yaml").read_text()
    assert len(list((tmp_path / "yolo/train/images").iterdir())) == 4
