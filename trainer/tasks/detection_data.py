"""Detection splits: images with boxes (xyxy, original pixels) and 0-based class indices, read from the coco,
yolo or voc layout (kiln.trainer.tasks.detection_formats) and decoded lazily.

Whatever the format, boxes are clipped to their image, and a box with no area left is dropped: one warning per
split counts them. Images without boxes are negatives and stay in the split. ``coco_ground_truth`` gives the
split as a COCO JSON in original pixels, which predictions are scored against (and written beside).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from kiln.api.resolve import ResolvedTrainingJob
from kiln.trainer.class_stats import ClassStats
from kiln.trainer.data import hold_out_indices, load_image
from kiln.trainer.distributed import World
from kiln.trainer.errors import InvalidInput
from kiln.trainer.tasks.base import Batch, Pipeline
from kiln.trainer.tasks.detection_formats import FORMATS, AnnotatedImage

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class BoxedImage:
    path: Path
    size: tuple[int, int]  # (height, width) of the original image
    boxes: np.ndarray  # float32 [N, 4] xyxy in original pixels, clipped, none degenerate
    labels: np.ndarray  # int64 [N], 0-based
    dropped: int  # degenerate boxes its annotations held


def clip_boxes(entry: AnnotatedImage) -> BoxedImage:
    """``entry`` with its boxes clipped to the image and those left without area dropped."""
    height, width = entry.size
    boxes = entry.boxes.copy()
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return BoxedImage(entry.path, entry.size, boxes[keep], entry.labels[keep], int((~keep).sum()))


@dataclass(frozen=True)
class DetectionSplit:
    """A detection split: satisfies kiln.trainer.tasks.base.SplitData."""

    root: Path
    split: str
    class_names: tuple[str, ...]  # index k is class k (0-based; no background entry)
    images: tuple[BoxedImage, ...]

    @property
    def dropped_boxes(self) -> int:
        return sum(image.dropped for image in self.images)

    def __len__(self) -> int:
        return len(self.images)

    def describe(self, index: int) -> str:
        path = self.images[index].path
        return path.relative_to(self.root).as_posix() if path.is_relative_to(self.root) else str(path)

    def image_size(self, index: int) -> tuple[int, int]:
        return self.images[index].size

    def annotations(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(boxes float32 [N, 4] xyxy in original pixels, labels int64 [N])."""
        return self.images[index].boxes, self.images[index].labels

    def dataset(self, pipeline: Pipeline) -> Dataset[Batch]:
        return DetectionDataset(self, pipeline)

    def coco_ground_truth(self) -> dict[str, Any]:
        """The split as a COCO instances JSON in original pixels: image id = index + 1, category id = class + 1."""
        images: list[dict[str, Any]] = []
        annotations: list[dict[str, Any]] = []
        for index, entry in enumerate(self.images):
            height, width = entry.size
            images.append({"id": index + 1, "file_name": self.describe(index), "height": height, "width": width})
            for (x1, y1, x2, y2), label in zip(entry.boxes.tolist(), entry.labels.tolist(), strict=True):
                w, h = x2 - x1, y2 - y1
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": index + 1,
                        "category_id": label + 1,
                        "bbox": [x1, y1, w, h],
                        "area": w * h,
                        "iscrowd": 0,
                    }
                )
        categories = [{"id": k + 1, "name": name} for k, name in enumerate(self.class_names)]
        return {"images": images, "annotations": annotations, "categories": categories}

    def count_classes(self, class_names: tuple[str, ...], job: ResolvedTrainingJob, world: World) -> ClassStats:
        """Boxes per class and images holding each class, from the listing every rank holds: nothing to reduce."""
        classes = len(class_names)
        counts = np.zeros(classes, dtype=np.int64)
        images = np.zeros(classes, dtype=np.int64)
        for entry in self.images:
            counts += np.bincount(entry.labels, minlength=classes)
            images[np.unique(entry.labels)] += 1
        return ClassStats("boxes", class_names, tuple(counts.tolist()), tuple(images.tolist()), split_size=len(self))

    def subset(self, indices: Sequence[int], split: str) -> DetectionSplit:
        return replace(self, split=split, images=tuple(self.images[i] for i in indices))


def resized_shape(original: tuple[int, int], side: int) -> tuple[int, int]:
    """(height, width) of an image whose longer side is resized to ``side``, aspect kept: rounded as
    albumentations' LongestMaxSize rounds (round(d * scale), at least 1), so boxes map back exactly."""
    height, width = original
    scale = side / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


class DetectionDataset(Dataset[Batch]):
    """Items of a split through a bbox-aware pipeline (kiln.trainer.augment.detection_*_pipeline)."""

    def __init__(self, split: DetectionSplit, pipeline: Pipeline) -> None:
        self.split = split
        self.pipeline = pipeline

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> Batch:
        entry = self.split.images[index]
        image = load_image(entry.path)
        if image.shape[:2] != entry.size:
            raise InvalidInput(
                f"image {entry.path} is {image.shape[1]}x{image.shape[0]} but its annotations say "
                f"{entry.size[1]}x{entry.size[0]}"
            )
        out = self.pipeline(image=image, bboxes=entry.boxes, labels=entry.labels)
        boxes = np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4)
        labels = np.asarray(out["labels"], dtype=np.int64).reshape(-1)
        # Detectors refuse a box without area; a crop can leave one even after albumentations' own filter.
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        tensor = out["image"]
        # The pipelines end by resizing the longer side to the image size and padding at the bottom right, so
        # the output's longer side is that size and the scale back to the original is one factor per axis.
        resized = resized_shape(entry.size, max(tensor.shape[-2:]))
        scale = (entry.size[0] / resized[0], entry.size[1] / resized[1])
        return {
            "image": tensor,
            "boxes": torch.from_numpy(boxes[keep]),
            "labels": torch.from_numpy(labels[keep]),
            "index": index,
            "scale": torch.tensor(scale, dtype=torch.float32),
        }


def detection_collate(items: Sequence[Batch]) -> Batch:
    """A batch of variable-size targets: images, boxes and labels stay lists (torchvision detectors take lists)."""
    return {
        "image": [item["image"] for item in items],
        "boxes": [item["boxes"] for item in items],
        "labels": [item["labels"] for item in items],
        "index": torch.tensor([int(item["index"]) for item in items], dtype=torch.long),
        "scale": torch.stack([item["scale"] for item in items]),
    }


def read_detection_split(
    root: Path, fmt: str, *, split: str, class_names: tuple[str, ...] | None = None
) -> DetectionSplit:
    """Split ``split`` at ``root`` in format ``fmt`` (coco, yolo or voc). ``class_names``: the training split's,
    which val and test must use (None for the training split, whose files name its classes)."""
    listing = FORMATS.get(fmt).read(root, split, class_names)
    if not listing.images:
        raise InvalidInput(f"data.{split}.uri: {root} holds no images")
    base = root if root.is_dir() else root.parent
    images = tuple(clip_boxes(entry) for entry in listing.images)
    result = DetectionSplit(base, split, listing.class_names, images)
    if result.dropped_boxes:
        log.warning(
            "dropped %d degenerate boxes in %s (no area left once clipped to the image)", result.dropped_boxes, split
        )
    return result


def hold_out(train: DetectionSplit, fraction: float, seed: int) -> tuple[DetectionSplit, DetectionSplit]:
    """Split off ``fraction`` of the training split for validation, the same way on every rank."""
    kept, held = hold_out_indices(len(train), fraction, seed)
    return train.subset(kept, "train"), train.subset(held, "val")
