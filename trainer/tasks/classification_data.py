"""Classification layouts: ``imagefolder`` (one subfolder per class) and ``csv`` (path,label rows)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from kiln.api.resolve import ResolvedTrainingJob
from kiln.trainer.class_stats import ClassStats
from kiln.trainer.data import IMAGE_SUFFIXES, csv_rows, hold_out_indices, load_image
from kiln.trainer.distributed import World
from kiln.trainer.errors import InvalidInput
from kiln.trainer.registry import Registry
from kiln.trainer.tasks.base import Batch, Pipeline

Sample = tuple[Path, str]  # (image path, class name)


@dataclass(frozen=True)
class LabelledImages:
    """A classification split: image paths with class indices, decoded lazily."""

    root: Path
    samples: tuple[tuple[Path, int], ...]

    def __len__(self) -> int:
        return len(self.samples)

    def dataset(self, pipeline: Pipeline) -> Dataset[Batch]:
        return ImageDataset(self.samples, pipeline)

    def describe(self, index: int) -> str:
        path = self.samples[index][0]
        return str(path.relative_to(self.root)) if path.is_relative_to(self.root) else str(path)

    def count_classes(self, class_names: tuple[str, ...], job: ResolvedTrainingJob, world: World) -> ClassStats:
        """Samples per class, from the listing every rank holds: nothing to read, nothing to reduce."""
        counts = np.bincount([label for _, label in self.samples], minlength=len(class_names)).tolist()
        return ClassStats("samples", class_names, tuple(counts), tuple(counts), split_size=len(self))

    def subset(self, indices: Sequence[int]) -> LabelledImages:
        return LabelledImages(self.root, tuple(self.samples[i] for i in indices))


class ImageDataset(Dataset[Batch]):
    def __init__(self, samples: Sequence[tuple[Path, int]], pipeline: Pipeline) -> None:
        self.samples = samples
        self.pipeline = pipeline

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Batch:
        path, label = self.samples[index]
        image = self.pipeline(image=load_image(path))["image"]
        return {"image": image, "target": torch.tensor(label), "index": torch.tensor(index)}


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def read_imagefolder(root: Path, split: str) -> list[Sample]:
    if not root.is_dir():
        raise InvalidInput(f"data.{split}.uri: {root} is not a folder (imagefolder wants one subfolder per class)")
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise InvalidInput(f"data.{split}.uri: {root} has no class subfolders")
    samples: list[Sample] = []
    for folder in classes:
        images = sorted(p for p in folder.rglob("*") if _is_image(p))
        if not images:
            raise InvalidInput(f"data.{split}: class folder {folder} has no images")
        samples.extend((image, folder.name) for image in images)
    return samples


def read_csv(path: Path, split: str) -> list[Sample]:
    path, rows = csv_rows(path, split, ("path", "label"))
    samples: list[Sample] = []
    for number, row in rows:
        image = (path.parent / row[0].strip()).resolve()
        if not image.is_file():
            raise InvalidInput(f"data.{split}.uri: {path} row {number}: {row[0]} does not exist")
        samples.append((image, row[1].strip()))
    return samples


@dataclass(frozen=True)
class FormatInfo:
    name: str
    read: Callable[[Path, str], list[Sample]]


FORMATS: Registry[FormatInfo] = Registry("classification data format")
FORMATS.register(FormatInfo("imagefolder", read_imagefolder))
FORMATS.register(FormatInfo("csv", read_csv))


def class_order(names: set[str]) -> list[str]:
    """Class names sorted, numerically when they all are numbers (so 10 comes after 9)."""
    return sorted(names, key=lambda n: (0, int(n), "") if n.isdigit() else (1, 0, n))


def index_samples(samples: list[Sample], classes: list[str], root: Path, split: str) -> LabelledImages:
    lookup = {name: i for i, name in enumerate(classes)}
    unknown = sorted({name for _, name in samples} - lookup.keys())
    if unknown:
        raise InvalidInput(f"data.{split}: classes {', '.join(unknown[:10])} do not occur in data.train")
    return LabelledImages(root, tuple((path, lookup[name]) for path, name in samples))


def hold_out(train: LabelledImages, fraction: float, seed: int) -> tuple[LabelledImages, LabelledImages]:
    """Split off ``fraction`` of the training split for validation, the same way on every rank."""
    kept, held = hold_out_indices(len(train), fraction, seed)
    return train.subset(kept), train.subset(held)
