"""A deterministic synthetic detection dataset: circles, squares and triangles on textured, noisy backgrounds.

Nothing is downloaded. Each image holds one to four shapes of varying size (some only a few pixels across) in
random colours, placed so that they barely overlap; about one image in ten holds none (a negative). A shape's
box is the tight pixel extent of what was drawn for it. The same seed writes the same bytes.

Layouts, for ``--format coco``, ``yolo`` or ``both`` (the default):

- ``OUT/coco/<split>/annotations.json`` and ``OUT/coco/<split>/images/NNNN.png``;
- ``OUT/yolo/<split>/images/NNNN.png``, ``OUT/yolo/<split>/labels/NNNN.txt`` (none for a negative, as
  Ultralytics writes them) and ``OUT/yolo/data.yaml`` naming the classes.

    python -m kiln.trainer.detection_shapes .kiln/data/shapes-detection   # train 512, val 96, test 96 of 128 px
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image, ImageDraw

CLASSES = ("circle", "square", "triangle")
SPLITS = {"train": 512, "val": 96, "test": 96}
FORMATS = ("coco", "yolo")
NEGATIVES = 0.1  # the share of images without any shape
MAX_OVERLAP = 0.2  # a shape whose box overlaps an earlier one more than this (IoU) is placed again

Box = tuple[int, int, int, int]  # x1, y1, x2, y2: pixel corners, x2 and y2 exclusive


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A colour gradient with a random stripe texture and pixel noise, float HxWx3."""
    ys, xs = np.mgrid[0:size, 0:size] / size
    ramp = (xs * rng.uniform(-60, 60) + ys * rng.uniform(-60, 60))[..., None]
    angle, period = rng.uniform(0, np.pi), rng.uniform(0.08, 0.3)
    stripes = np.sin((xs * np.cos(angle) + ys * np.sin(angle)) * 2 * np.pi / period)[..., None]
    base = rng.uniform(60, 190, size=3) + ramp + stripes * rng.uniform(5, 25, size=3)
    return base + rng.normal(0, 12, size=(size, size, 3))


def _iou(a: Box, b: Box) -> float:
    w = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union else 0.0


def _outline(rng: np.random.Generator, kind: int, size: int) -> list[tuple[float, float]]:
    """Corner points (the bounding square for a circle) of a shape of class ``kind`` inside the image."""
    radius = size * (rng.uniform(0.03, 0.08) if rng.random() < 0.3 else rng.uniform(0.08, 0.22))
    cx, cy = rng.uniform(radius, size - radius, size=2)
    if kind == 0:
        return [(cx - radius, cy - radius), (cx + radius, cy + radius)]
    if kind == 1:
        angle = rng.uniform(0, np.pi / 2)
        corners = [angle + k * np.pi / 2 + np.pi / 4 for k in range(4)]
    else:
        angle = rng.uniform(0, 2 * np.pi)
        corners = [angle + k * 2 * np.pi / 3 for k in range(3)]
    return [(cx + radius * np.cos(a), cy + radius * np.sin(a)) for a in corners]


def _extent(mask: Image.Image) -> Box | None:
    """The tight box of a shape's drawn pixels (PIL's getbbox: right and bottom exclusive)."""
    return mask.getbbox()


def draw_sample(rng: np.random.Generator, size: int) -> tuple[np.ndarray, list[Box], list[int]]:
    """One RGB uint8 image, its boxes and their 0-based class indices."""
    image = Image.fromarray(np.clip(_background(rng, size), 0, 255).astype(np.uint8))
    paint = ImageDraw.Draw(image)
    boxes: list[Box] = []
    labels: list[int] = []
    count = 0 if rng.random() < NEGATIVES else int(rng.integers(1, 5))
    for _ in range(count):
        kind = int(rng.integers(0, len(CLASSES)))
        for _attempt in range(10):
            outline = _outline(rng, kind, size)
            mask = Image.new("L", (size, size), 0)
            draw = ImageDraw.Draw(mask)
            draw.ellipse(outline, fill=1) if kind == 0 else draw.polygon(outline, fill=1)
            box = _extent(mask)
            if box is not None and all(_iou(box, other) <= MAX_OVERLAP for other in boxes):
                break
        else:
            continue  # no room left for it: the image holds fewer shapes
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        paint.ellipse(outline, fill=colour) if kind == 0 else paint.polygon(outline, fill=colour)
        boxes.append(box)
        labels.append(kind)
    pixels = np.asarray(image).astype(np.float64) + rng.normal(0, 6, size=(size, size, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8), boxes, labels


def _coco_document(samples: list[tuple[list[Box], list[int]]], size: int) -> dict[str, Any]:
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for index, (boxes, labels) in enumerate(samples):
        images.append({"id": index + 1, "file_name": f"{index:04d}.png", "width": size, "height": size})
        for (x1, y1, x2, y2), label in zip(boxes, labels, strict=True):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": index + 1,
                    "category_id": label + 1,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1),
                    "iscrowd": 0,
                }
            )
    categories = [{"id": k + 1, "name": name} for k, name in enumerate(CLASSES)]
    return {"images": images, "annotations": annotations, "categories": categories}


def _yolo_line(box: Box, label: int, size: int) -> str:
    x1, y1, x2, y2 = (v / size for v in box)
    return f"{label} {(x1 + x2) / 2:.6f} {(y1 + y2) / 2:.6f} {x2 - x1:.6f} {y2 - y1:.6f}\n"


def write_split(
    dest: Path, split: str, count: int, *, size: int, seed: int, offset: int, formats: tuple[str, ...]
) -> None:
    rng = np.random.default_rng([seed, offset])
    samples = []
    for fmt in formats:
        (dest / fmt / split / "images").mkdir(parents=True)
    if "yolo" in formats:
        (dest / "yolo" / split / "labels").mkdir()
    for index in range(count):
        image, boxes, labels = draw_sample(rng, size)
        samples.append((boxes, labels))
        for fmt in formats:
            Image.fromarray(image).save(dest / fmt / split / "images" / f"{index:04d}.png")
        if "yolo" in formats and boxes:
            lines = "".join(_yolo_line(box, label, size) for box, label in zip(boxes, labels, strict=True))
            (dest / "yolo" / split / "labels" / f"{index:04d}.txt").write_text(lines)
    if "coco" in formats:
        document = _coco_document(samples, size)
        (dest / "coco" / split / "annotations.json").write_text(json.dumps(document, indent=1) + "\n")


def write_detection_shapes(
    dest: Path,
    *,
    splits: dict[str, int] | None = None,
    size: int = 128,
    seed: int = 0,
    formats: tuple[str, ...] = FORMATS,
) -> Path:
    """Write the dataset under ``dest`` (layouts in the module docstring). Idempotent: a finished dataset with
    the same settings is kept."""
    splits = splits or SPLITS
    marker = dest / ".complete"
    settings = repr((splits, size, seed, formats))
    if marker.exists() and marker.read_text() == settings:
        return dest
    shutil.rmtree(dest, ignore_errors=True)
    for offset, (split, count) in enumerate(sorted(splits.items())):
        write_split(dest, split, count, size=size, seed=seed, offset=offset, formats=formats)
    if "yolo" in formats:
        document = {**{split: f"{split}/images" for split in splits}, "names": list(CLASSES)}
        (dest / "yolo" / "data.yaml").write_text(yaml.safe_dump(document, sort_keys=False))
    marker.write_text(settings)
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write the synthetic shapes detection dataset.")
    parser.add_argument("dest", type=Path)
    parser.add_argument("--format", choices=[*FORMATS, "both"], default="both")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=SPLITS["train"])
    parser.add_argument("--val", type=int, default=SPLITS["val"])
    parser.add_argument("--test", type=int, default=SPLITS["test"])
    args = parser.parse_args(argv)
    counts = {"train": args.train, "val": args.val, "test": args.test}
    formats = FORMATS if args.format == "both" else (args.format,)
    path = write_detection_shapes(args.dest, splits=counts, size=args.size, seed=args.seed, formats=formats)
    shown = ", ".join(f"{k} {v}" for k, v in counts.items())
    print(f"shapes-detection: {sum(counts.values())} images ({shown}) as {' and '.join(formats)} in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
