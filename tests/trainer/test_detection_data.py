"""Reading detection data: the coco, yolo and voc layouts to the same boxes, the edge cases (negatives,
degenerate and out-of-range boxes, unknown classes, missing and malformed files), and the COCO ground truth.

Expected boxes come from the test's own reading of the files (json, plain text) or from hand-written values,
never from the readers under test.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

from kiln.trainer.augment import detection_eval_pipeline
from kiln.trainer.class_stats import ClassStats
from kiln.trainer.detection_shapes import CLASSES, write_detection_shapes
from kiln.trainer.errors import InvalidInput
from kiln.trainer.tasks.detection_data import DetectionSplit, detection_collate, hold_out, read_detection_split

SIZE = 64


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("shapes-detection")
    return write_detection_shapes(root, splits={"train": 30, "val": 6}, size=SIZE, seed=3)


def coco_boxes_by_hand(path: Path) -> list[tuple[list[list[float]], list[int]]]:
    """Per image (in file order): xyxy boxes and 0-based class indices (categories in id order)."""
    document = json.loads(path.read_text())
    order = {category["id"]: k for k, category in enumerate(sorted(document["categories"], key=lambda c: c["id"]))}
    out: dict[int, tuple[list[list[float]], list[int]]] = {image["id"]: ([], []) for image in document["images"]}
    for annotation in document["annotations"]:
        x, y, w, h = annotation["bbox"]
        out[annotation["image_id"]][0].append([x, y, x + w, y + h])
        out[annotation["image_id"]][1].append(order[annotation["category_id"]])
    return [out[image["id"]] for image in document["images"]]


def yolo_boxes_by_hand(labels: Path, names: list[str], size: int) -> list[tuple[list[list[float]], list[int]]]:
    out = []
    for name in names:
        path = labels / f"{Path(name).stem}.txt"
        rows = [line.split() for line in path.read_text().splitlines()] if path.exists() else []
        boxes = []
        for _, cx, cy, w, h in ([float(v) for v in row] for row in rows):
            boxes.append([(cx - w / 2) * size, (cy - h / 2) * size, (cx + w / 2) * size, (cy + h / 2) * size])
        out.append((boxes, [int(row[0]) for row in rows]))
    return out


Expected = Sequence[tuple[Sequence[Sequence[float]], list[int]]]  # per image: xyxy boxes, class indices


def assert_boxes(split: DetectionSplit, expected: Expected, atol: float) -> None:
    assert len(split) == len(expected)
    for index, (boxes, labels) in enumerate(expected):
        got_boxes, got_labels = split.annotations(index)
        assert got_boxes.dtype == np.float32 and got_labels.dtype == np.int64
        np.testing.assert_allclose(got_boxes, np.array(boxes, dtype=np.float64).reshape(-1, 4), atol=atol)
        assert got_labels.tolist() == labels


def test_coco_and_yolo_read_the_generated_boxes(shapes: Path) -> None:
    by_hand = coco_boxes_by_hand(shapes / "coco/train/annotations.json")
    coco = read_detection_split(shapes / "coco/train", "coco", split="train")
    yolo = read_detection_split(shapes / "yolo/train", "yolo", split="train")
    assert coco.class_names == yolo.class_names == ("circle", "square", "triangle")
    assert_boxes(coco, by_hand, atol=0)
    # yolo stores 6 decimals of a fraction of the image: 1e-6 * 64 px, rounded twice.
    assert_boxes(yolo, by_hand, atol=1e-4)
    names = [coco.describe(i) for i in range(len(coco))]
    assert names == [yolo.describe(i) for i in range(len(yolo))] == [f"images/{i:04d}.png" for i in range(30)]
    assert_boxes(yolo, yolo_boxes_by_hand(shapes / "yolo/train/labels", names, SIZE), atol=1e-4)
    assert [coco.image_size(i) for i in range(len(coco))] == [(SIZE, SIZE)] * 30
    assert any(len(boxes) == 0 for boxes, _ in by_hand), "the generator writes some negatives"
    assert coco.dropped_boxes == yolo.dropped_boxes == 0


def test_val_follows_the_training_classes(shapes: Path) -> None:
    val = read_detection_split(shapes / "yolo/val", "yolo", split="val", class_names=tuple(CLASSES))
    assert val.class_names == tuple(CLASSES) and len(val) == 6
    with pytest.raises(InvalidInput, match=r"data\.yaml: names .* differ from \['a', 'b', 'c'\] \(model\.classNames"):
        read_detection_split(shapes / "yolo/val", "yolo", split="val", class_names=("a", "b", "c"))


def voc_xml(filename: str, objects: list[tuple[str, tuple[int, int, int, int]]], size: tuple[int, int]) -> str:
    body = "".join(
        f"  <object>\n    <name>{name}</name>\n    <difficult>0</difficult>\n    <bndbox>\n"
        f"      <xmin>{b[0]}</xmin>\n      <ymin>{b[1]}</ymin>\n      <xmax>{b[2]}</xmax>\n      <ymax>{b[3]}</ymax>\n"
        "    </bndbox>\n  </object>\n"
        for name, b in objects
    )
    return (f"<annotation>\n  <filename>{filename}</filename>\n  <size><width>{size[1]}</width>"
            f"<height>{size[0]}</height><depth>3</depth></size>\n{body}</annotation>\n")  # fmt: skip


def write_voc(root: Path) -> Path:
    (root / "JPEGImages").mkdir(parents=True)
    (root / "Annotations").mkdir()
    for name, (h, w) in {"a": (40, 60), "b": (50, 50), "c": (30, 30)}.items():
        Image.fromarray(np.full((h, w, 3), 120, np.uint8)).save(root / "JPEGImages" / f"{name}.jpg")
    objects_a = [("dog", (11, 21, 40, 35)), ("cat", (1, 1, 60, 40))]
    (root / "Annotations/a.xml").write_text(voc_xml("a.jpg", objects_a, (40, 60)))
    objects_b = [("cat", (5, 6, 90, 20)), ("dog", (31, 30, 30, 45))]  # the first overflows, the second has no width
    (root / "Annotations/b.xml").write_text(voc_xml("b.jpg", objects_b, (50, 50)))
    return root  # c.jpg has no annotation: a negative


def test_voc_reads_hand_written_boxes(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        split = read_detection_split(write_voc(tmp_path), "voc", split="train")
    assert split.class_names == ("cat", "dog")  # sorted union of the names
    # 1-based inclusive pixel indices: xmin 11 is the 11th pixel, whose left edge is x = 10.
    expected = [([[10, 20, 40, 35], [0, 0, 60, 40]], [1, 0]), ([[4, 5, 50, 20]], [0]), ([], [])]
    assert_boxes(split, expected, atol=0)
    assert [split.describe(i) for i in range(3)] == ["JPEGImages/a.jpg", "JPEGImages/b.jpg", "JPEGImages/c.jpg"]
    assert split.image_size(0) == (40, 60)
    assert split.dropped_boxes == 1
    assert "dropped 1 degenerate boxes in train" in caplog.text


def test_voc_bad_inputs_name_the_file_and_line(tmp_path: Path) -> None:
    root = write_voc(tmp_path)
    with pytest.raises(InvalidInput, match=r"a\.xml line 4: class 'dog' is not one of \['cat'\]"):
        read_detection_split(root, "voc", split="val", class_names=("cat",))
    (root / "Annotations/b.xml").write_text("<annotation>\n  <filename>b.jpg</filename>\n  <object>\n</annotation>\n")
    with pytest.raises(InvalidInput, match=r"b\.xml line 4: not valid XML"):
        read_detection_split(root, "voc", split="train")
    (root / "Annotations/b.xml").write_text(voc_xml("gone.jpg", [], (5, 5)).replace("b.jpg", "gone.jpg"))
    (root / "Annotations/b.xml").rename(root / "Annotations/gone.xml")
    with pytest.raises(InvalidInput, match=r"gone\.xml: its image .*gone\.jpg does not exist"):
        read_detection_split(root, "voc", split="train")


def write_coco(root: Path, annotations: list[dict[str, object]], sizes: tuple[tuple[int, int], ...]) -> Path:
    (root / "images").mkdir(parents=True)
    images = []
    for index, (h, w) in enumerate(sizes):
        Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(root / "images" / f"{index}.png")
        images.append({"id": 100 + index, "file_name": f"{index}.png", "height": h, "width": w})
    categories = [{"id": 7, "name": "b"}, {"id": 3, "name": "a"}]  # ids need not start at 1 or come in order
    document = {"images": images, "annotations": annotations, "categories": categories}
    (root / "annotations.json").write_text(json.dumps(document, indent=1))
    return root


EDGE_ANNOTATIONS: list[dict[str, object]] = [
    {"id": 1, "image_id": 100, "category_id": 7, "bbox": [-5, 10, 20, 10]},  # out of range: clipped to [0, 10, 15, 20]
    {"id": 2, "image_id": 100, "category_id": 3, "bbox": [50, 30, 30, 30]},  # clipped to [50, 30, 60, 40]
    {"id": 3, "image_id": 100, "category_id": 3, "bbox": [70, 10, 5, 5]},  # outside the image: dropped
    {"id": 4, "image_id": 101, "category_id": 3, "bbox": [4, 4, 0, 8]},  # no width: dropped
    {"id": 5, "image_id": 101, "category_id": 7, "bbox": [1, 2, 3, 4]},
    {"id": 6, "image_id": 101, "category_id": 3, "bbox": [0, 0, 9, 9], "iscrowd": 1},  # crowd: skipped
]  # image 102 has no annotation: a negative


def test_coco_clips_drops_and_keeps_negatives(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = write_coco(tmp_path, EDGE_ANNOTATIONS, ((40, 60), (20, 20), (30, 10)))
    with caplog.at_level(logging.WARNING):
        split = read_detection_split(root, "coco", split="train")
    assert split.class_names == ("a", "b")  # category ids 3, 7
    assert_boxes(split, [([[0, 10, 15, 20], [50, 30, 60, 40]], [1, 0]), ([[1, 2, 4, 6]], [1]), ([], [])], atol=0)
    assert split.dropped_boxes == 2
    assert caplog.text.count("degenerate") == 1 and "dropped 2 degenerate boxes in train" in caplog.text
    assert [split.image_size(i) for i in range(3)] == [(40, 60), (20, 20), (30, 10)]
    stats = split.count_classes(split.class_names, None, None)  # the listing suffices: no job, no world
    assert (stats.unit, stats.counts, stats.images, stats.split_size) == ("boxes", (1, 2), (1, 2), 3)
    record = stats.to_json()["classes"][1]
    assert (record["name"], record["boxes"], record["images"]) == ("b", 2, 2)
    assert ClassStats.from_json(stats.to_json()) == stats  # class-stats.json reads back on a restart
    # The annotations file named in the uri works as well as its folder.
    assert len(read_detection_split(root / "annotations.json", "coco", split="train")) == 3


def test_coco_ground_truth_loads_in_pycocotools(tmp_path: Path) -> None:
    split = read_detection_split(write_coco(tmp_path, EDGE_ANNOTATIONS, ((40, 60), (20, 20), (30, 10))), "coco",
                                 split="val")  # fmt: skip
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(split.coco_ground_truth()))
    coco = COCO(str(path))
    assert sorted(coco.getImgIds()) == [1, 2, 3]
    assert coco.loadImgs(1)[0] == {"id": 1, "file_name": "images/0.png", "height": 40, "width": 60}
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["a", "b"]
    first, second = (coco.loadAnns(coco.getAnnIds(imgIds=[image])) for image in (1, 2))
    assert sorted(tuple(a["bbox"]) for a in first) == [(0, 10, 15, 10), (50, 30, 10, 10)]
    assert [(a["category_id"], a["area"], a["iscrowd"]) for a in second] == [(2, 12, 0)]
    assert coco.getAnnIds(imgIds=[3]) == []


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"annotations": [{"id": 1, "image_id": 100, "category_id": 9, "bbox": [1, 1, 2, 2]}]},
         r"annotations\.json: annotations\[0\]: category_id 9 is not in categories"),
        ({"annotations": [{"id": 1, "image_id": 5, "category_id": 3, "bbox": [1, 1, 2, 2]}]},
         r"annotations\.json: annotations\[0\]: image_id 5 is not in images"),
        ({"annotations": [{"id": 1, "image_id": 100, "category_id": 3, "bbox": [1, 1, 2]}]},
         r"annotations\.json: annotations\[0\]: bbox \[1, 1, 2\] is not \[x, y, width, height\]"),
        ({"images": [{"id": 1, "file_name": "missing.png", "height": 4, "width": 4}]},
         r"annotations\.json: images\[0\]: file_name missing\.png: .*missing\.png does not exist"),
        ({"categories": None}, r"annotations\.json: categories is missing"),
    ],
)  # fmt: skip
def test_coco_bad_inputs_name_the_file_and_entry(tmp_path: Path, change: dict[str, object], message: str) -> None:
    root = write_coco(tmp_path, [], ((8, 8),))
    document = json.loads((root / "annotations.json").read_text()) | change
    (root / "annotations.json").write_text(json.dumps({k: v for k, v in document.items() if v is not None}))
    with pytest.raises(InvalidInput, match=message):
        read_detection_split(root, "coco", split="train")


def test_coco_bad_json_names_the_line(tmp_path: Path) -> None:
    root = write_coco(tmp_path, [], ((8, 8),))
    (root / "annotations.json").write_text('{\n  "images": [],\n  "categories": [,]\n}\n')
    with pytest.raises(InvalidInput, match=r"annotations\.json line 3: not valid JSON"):
        read_detection_split(root, "coco", split="train")


def write_yolo(root: Path, labels: dict[str, str], *, names: str | None = "names: [a, b, c]\n") -> Path:
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for stem in ("p", "q", "r"):
        Image.fromarray(np.zeros((40, 80, 3), np.uint8)).save(root / "images" / f"{stem}.png")
    for stem, text in labels.items():
        (root / "labels" / f"{stem}.txt").write_text(text)
    if names is not None:
        (root.parent / "data.yaml").write_text(names)  # above the split, where Ultralytics keeps it
    return root


def test_yolo_missing_label_files_are_negatives(tmp_path: Path) -> None:
    # q has an empty label file and r none: both are images without boxes.
    root = write_yolo(tmp_path / "train", {"p": "2 0.5 0.5 0.25 0.5\n\n0 0.1 0.1 0.4 0.4\n", "q": ""})
    split = read_detection_split(root, "yolo", split="train")
    # 80x40 image: cx 0.5 w 0.25 -> x 30..50; cy 0.5 h 0.5 -> y 10..30. The second overflows the top left corner.
    assert_boxes(split, [([[30, 10, 50, 30], [0, 0, 24, 12]], [2, 0]), ([], []), ([], [])], atol=1e-4)
    shutil.rmtree(root / "labels")
    with pytest.raises(InvalidInput, match=r"has no labels folder"):
        read_detection_split(root, "yolo", split="train")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0 0.5 0.5 0.1 0.1\n3 0.5 0.5 0.1 0.1\n",
         r"p\.txt line 2: class id 3 is not one of data\.yaml's names \(0\.\.2\)"),
        ("0 0.5 0.5 0.1\n", r"p\.txt line 1: 4 values; want 'class cx cy w h'"),
        ("\n\n1 0.5 0.5 wide 0.1\n", r"p\.txt line 3: '1 0\.5 0\.5 wide 0\.1' is not 'class cx cy w h'"),
        ("-1 0.5 0.5 0.1 0.1\n", r"p\.txt line 1: class id -1 is not one of"),
        ("0 0.5 nan 0.1 0.1\n", r"p\.txt line 1: .* holds a non-finite number"),
    ],
)  # fmt: skip
def test_yolo_bad_lines_name_the_file_and_line(tmp_path: Path, text: str, message: str) -> None:
    root = write_yolo(tmp_path / "train", {"p": text})
    with pytest.raises(InvalidInput, match=message):
        read_detection_split(root, "yolo", split="train")


def test_yolo_bad_layouts(tmp_path: Path) -> None:
    root = write_yolo(tmp_path / "a" / "train", {"s": "0 0.5 0.5 0.1 0.1\n"})
    with pytest.raises(InvalidInput, match=r"label file .*s\.txt has no image in"):
        read_detection_split(root, "yolo", split="train")
    root = write_yolo(tmp_path / "b" / "train", {}, names="nc: 3\n")
    with pytest.raises(InvalidInput, match=r"b/data\.yaml: no names"):
        read_detection_split(root, "yolo", split="train")
    root = write_yolo(tmp_path / "c" / "train", {}, names=None)
    with pytest.raises(InvalidInput, match=r"data\.train\.uri: no data\.yaml with names"):
        read_detection_split(root, "yolo", split="train")
    root = write_yolo(tmp_path / "d" / "train", {}, names="names: [a, b\n")
    with pytest.raises(InvalidInput, match=r"d/data\.yaml line \d+: not valid YAML"):
        read_detection_split(root, "yolo", split="train")


def test_yolo_ultralytics_images_split_layout(tmp_path: Path) -> None:
    """dataset/images/train with dataset/labels/train, data.yaml naming classes as a map (Ultralytics' own)."""
    (tmp_path / "images/train").mkdir(parents=True)
    (tmp_path / "labels/train").mkdir(parents=True)
    Image.fromarray(np.zeros((10, 20, 3), np.uint8)).save(tmp_path / "images/train/x.jpg")
    (tmp_path / "labels/train/x.txt").write_text("1 0.5 0.5 1.0 1.0\n1 0 0.5 0.2 0.2 0.4 0.8\n")  # a box, a triangle
    (tmp_path / "data.yaml").write_text("path: .\ntrain: images/train\nnames:\n  0: person\n  1: car\n")
    split = read_detection_split(tmp_path / "images/train", "yolo", split="train")
    assert split.class_names == ("person", "car")
    assert_boxes(split, [([[0, 0, 20, 10], [0, 2, 8, 8]], [1, 1])], atol=1e-4)


def test_unknown_format_and_empty_split(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match=r"detection data format 'pascal'"):
        read_detection_split(tmp_path, "pascal", split="train")
    write_coco(tmp_path, [], ())
    with pytest.raises(InvalidInput, match=r"data\.train\.uri: .* holds no images"):
        read_detection_split(tmp_path, "coco", split="train")


def test_items_collate_and_hold_out(tmp_path: Path) -> None:
    split = read_detection_split(write_coco(tmp_path, EDGE_ANNOTATIONS, ((40, 60), (20, 20), (30, 10))), "coco",
                                 split="train")  # fmt: skip
    dataset = split.dataset(detection_eval_pipeline(30))
    batch = detection_collate([dataset[i] for i in range(3)])
    assert [tuple(image.shape) for image in batch["image"]] == [(3, 30, 30)] * 3
    assert [tuple(boxes.shape) for boxes in batch["boxes"]] == [(2, 4), (1, 4), (0, 4)]
    assert [labels.tolist() for labels in batch["labels"]] == [[1, 0], [1], []]
    assert batch["index"].tolist() == [0, 1, 2] and batch["index"].dtype == torch.long
    # 40x60 -> 20x30, 20x20 -> 30x30, 30x10 -> 30x10: original / resized per axis.
    torch.testing.assert_close(batch["scale"], torch.tensor([[2.0, 2.0], [2 / 3, 2 / 3], [1.0, 1.0]]))
    torch.testing.assert_close(batch["boxes"][0], torch.tensor([[0.0, 5, 7.5, 10], [25, 15, 30, 20]]))
    train, val = hold_out(split, 1 / 3, seed=0)
    assert (len(train), len(val), val.split) == (2, 1, "val")
    assert sorted([*map(train.describe, range(2)), val.describe(0)]) == [f"images/{i}.png" for i in range(3)]
