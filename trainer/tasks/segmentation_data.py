"""Segmentation layouts: ``segmentation-folder`` (``images/`` and ``masks/`` whose files match by name) and
``csv`` (image,mask rows). A mask is a single-channel image (PNG) of class indices, the same size as its image;
with ``data.palette`` it is a colour image whose colours map to classes (``Palette``).

Listing a split checks that every image has its mask; decoding a pair checks that the sizes agree and that every
mask value is a class index or ``data.ignoreIndex`` (every colour one of the palette's). Each problem is one
InvalidInput naming the file. ``count_mask_classes`` reads the masks alone, for the class statistics.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from kiln.api.resolve import ResolvedTrainingJob
from kiln.trainer.class_stats import ClassStats
from kiln.trainer.data import IMAGE_SUFFIXES, csv_rows, eval_loader, hold_out_indices, load_image
from kiln.trainer.distributed import World, all_reduce_sum
from kiln.trainer.errors import InvalidInput
from kiln.trainer.registry import Registry
from kiln.trainer.tasks.base import Batch, Pipeline

Pair = tuple[Path, Path]  # (image, mask)
Colour = Sequence[int]  # [r, g, b]


def _pack(rgb: np.ndarray) -> np.ndarray:
    """[..., 3] colours as one uint32 each (0xRRGGBB): a colour is then looked up as one number."""
    channels = rgb.astype(np.uint32)
    return (channels[..., 0] << 16) | (channels[..., 1] << 8) | channels[..., 2]


class Palette:
    """``data.palette``: colour k is class k, and ``ignore_colour`` (data.ignoreColor) reads as ignore_index.

    A mask's pixels are looked up all at once in the sorted packed colours (``np.searchsorted``): a few
    comparisons per pixel, and no 16 M-entry table per DataLoader worker."""

    def __init__(self, colours: Sequence[Colour], ignore_colour: Colour | None, ignore_index: int) -> None:
        entries = [(list(colour), k) for k, colour in enumerate(colours)]
        if ignore_colour is not None:
            entries.append((list(ignore_colour), ignore_index))
        keys = _pack(np.array([colour for colour, _ in entries], dtype=np.uint8))
        values = np.array([value for _, value in entries])
        order = np.argsort(keys)
        self._keys = keys[order]
        self._values = values[order].astype(np.uint8 if values.max() < 256 else np.uint16)
        self._listed = "data.palette" + (" or data.ignoreColor" if ignore_colour is not None else "")

    def indices(self, rgb: np.ndarray, path: Path) -> np.ndarray:
        """An HxWx3 uint8 mask as HxW class indices; a colour the palette lacks is an InvalidInput naming it."""
        keys = _pack(rgb)
        slots = np.searchsorted(self._keys, keys).clip(max=len(self._keys) - 1)
        known = self._keys[slots] == keys
        if not known.all():
            y, x = np.argwhere(~known)[0].tolist()
            others = int((~known).sum()) - 1
            raise InvalidInput(
                f"mask {path} has colour {rgb[y, x].tolist()} at pixel (x={x}, y={y}), which is not in "
                f"{self._listed}" + (f" ({others} more pixels of unlisted colours)" if others else "")
            )
        return self._values[slots]


def palette_of(job: ResolvedTrainingJob, ignore_index: int) -> Palette | None:
    data = job.spec.data
    return Palette(data.palette, data.ignore_color, ignore_index) if data.palette is not None else None


@dataclass(frozen=True)
class MaskedImages:
    """A segmentation split: (image, mask) pairs, decoded lazily and checked as they are decoded."""

    root: Path
    split: str
    samples: tuple[Pair, ...]
    names: tuple[str, ...]  # each image's path under the layout's image folder: predicted masks keep it
    labels: int  # valid mask values are 0..labels-1 (2 for binary segmentation) and ignore_index
    ignore_index: int
    palette: Palette | None = None  # colour masks (data.palette); None: masks hold class indices

    def __len__(self) -> int:
        return len(self.samples)

    def dataset(self, pipeline: Pipeline) -> Dataset[Batch]:
        return MaskDataset(self, pipeline)

    def describe(self, index: int) -> str:
        return _relative(self.samples[index][0], self.root)

    def describe_mask(self, index: int) -> str:
        return _relative(self.samples[index][1], self.root)

    def count_classes(self, class_names: tuple[str, ...], job: ResolvedTrainingJob, world: World) -> ClassStats:
        return count_mask_classes(self, class_names, job, world)

    def read_mask(self, index: int) -> np.ndarray:
        """Pair ``index``'s mask as checked class indices (colours mapped through the palette, if any)."""
        path = self.samples[index][1]
        mask = load_mask(path, self.palette)
        if self.palette is None:  # a palette yields nothing but its classes and ignore_index
            check_mask(mask, path, self.labels, self.ignore_index)
        return mask

    def prediction_key(self, index: int) -> str:
        """Where the predicted mask goes under the run: predictions-<split>/<image name>.png."""
        return f"predictions-{self.split}/{Path(self.names[index]).with_suffix('.png').as_posix()}"

    def subset(self, indices: Sequence[int], split: str) -> MaskedImages:
        return replace(
            self,
            split=split,
            samples=tuple(self.samples[i] for i in indices),
            names=tuple(self.names[i] for i in indices),
        )


def _relative(path: Path, root: Path) -> str:
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


INDEX_MODES = ("L", "P", "1", "I", "I;16", "I;16B", "I;16L")  # a palette-mode PNG stores indices (VOC)
COLOUR_MODES = ("RGB", "RGBA", "P", "PA", "L", "LA", "1")  # read as RGB with data.palette, alpha dropped


def load_mask(path: Path, palette: Palette | None = None) -> np.ndarray:
    """A mask as an HxW uint8 (uint16 for values above 255) array of class indices: the values it stores, or
    with ``palette`` its colours mapped to classes."""
    try:
        with Image.open(path) as image:
            if palette is None and image.mode not in INDEX_MODES:
                raise InvalidInput(
                    f"mask {path} is {image.mode}: a mask must be a single-channel image of class indices, "
                    "or set data.palette to read colour masks"
                )
            if palette is not None and image.mode not in COLOUR_MODES:
                raise InvalidInput(
                    f"mask {path} is {image.mode}: with data.palette a mask must be an RGB(A), palette-mode or "
                    "greyscale image"
                )
            values = np.asarray(image if palette is None else image.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise InvalidInput(f"corrupt or unreadable mask {path}: {exc}") from exc
    if palette is not None:
        return palette.indices(values, path)
    if values.size and (values.min() < 0 or values.max() > 65535):
        raise InvalidInput(f"mask {path} holds values outside 0..65535")
    return values.astype(np.uint8 if values.size == 0 or values.max() < 256 else np.uint16)


def check_mask(mask: np.ndarray, path: Path, labels: int, ignore_index: int) -> None:
    if mask.size == 0 or int(mask.max()) < labels:
        return
    bad = np.unique(mask[(mask >= labels) & (mask != ignore_index)])
    if bad.size:
        shown = ", ".join(str(v) for v in bad[:5].tolist())
        raise InvalidInput(
            f"mask {path} holds class index {shown}: classes are 0..{labels - 1} (model.numClasses), "
            f"and {ignore_index} (data.ignoreIndex) marks pixels to ignore"
        )


class MaskDataset(Dataset[Batch]):
    def __init__(self, split: MaskedImages, pipeline: Pipeline) -> None:
        self.split = split
        self.pipeline = pipeline

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> Batch:
        image_path, mask_path = self.split.samples[index]
        image, mask = load_image(image_path), self.split.read_mask(index)
        if image.shape[:2] != mask.shape:
            raise InvalidInput(
                f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} but image {image_path} is "
                f"{image.shape[1]}x{image.shape[0]}: a mask must be the size of its image"
            )
        out = self.pipeline(image=image, mask=mask)
        return {
            "image": out["image"],
            "mask": torch.as_tensor(np.asarray(out["mask"]).astype(np.int64)),
            "size": torch.tensor(image.shape[:2]),  # (height, width) before resizing: predictions go back to it
            "index": torch.tensor(index),
        }


class MaskCounts(Dataset[dict[str, torch.Tensor]]):
    """Per mask (no image is decoded): its pixels of each class, and of ignore_index."""

    def __init__(self, split: MaskedImages) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        mask = self.split.read_mask(index)
        ignored = mask == self.split.ignore_index
        pixels = np.bincount(mask[~ignored], minlength=self.split.labels).astype(np.int64)
        return {"pixels": torch.from_numpy(pixels), "ignored": torch.tensor(int(ignored.sum()))}


def count_mask_classes(
    split: MaskedImages, class_names: tuple[str, ...], job: ResolvedTrainingJob, world: World
) -> ClassStats:
    """Pixels per class, images holding each class, and ignored pixels over ``split``: each rank counts its
    shard (data.workers processes read the masks), then the sums are all-reduced."""
    labels = split.labels
    totals = torch.zeros(2 * labels + 1, dtype=torch.int64)  # pixels per class, images per class, ignored
    for batch in eval_loader(MaskCounts(split), job, world):
        totals[:labels] += batch["pixels"].sum(dim=0)
        totals[labels:-1] += (batch["pixels"] > 0).sum(dim=0)
        totals[-1] += batch["ignored"].sum()
    counts = all_reduce_sum(totals.to(world.device)).cpu().tolist()
    return ClassStats(
        unit="pixels",
        classes=class_names,
        counts=tuple(counts[:labels]),
        images=tuple(counts[labels:-1]),
        split_size=len(split),
        ignored=counts[-1],
    )


def _images_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def read_folder(root: Path, split: str) -> tuple[list[Pair], list[str]]:
    images_dir, masks_dir = root / "images", root / "masks"
    for folder in (images_dir, masks_dir):
        if not folder.is_dir():
            raise InvalidInput(f"data.{split}.uri: {root} has no {folder.name}/ (segmentation-folder wants images/ "
                               "and masks/ with matching file names)")  # fmt: skip
    images = _images_under(images_dir)
    if not images:
        raise InvalidInput(f"data.{split}.uri: {images_dir} holds no images")
    masks = {p.relative_to(masks_dir).with_suffix("").as_posix(): p for p in _images_under(masks_dir)}
    pairs, names = [], []
    for image in images:
        name = image.relative_to(images_dir)
        mask = masks.get(name.with_suffix("").as_posix())
        if mask is None:
            expected = masks_dir / name.with_suffix(".png")
            raise InvalidInput(f"data.{split}: image {image} has no mask (expected {expected})")
        pairs.append((image, mask))
        names.append(name.as_posix())
    return pairs, names


def read_csv(path: Path, split: str) -> tuple[list[Pair], list[str]]:
    path, rows = csv_rows(path, split, ("image", "mask"))
    pairs, names = [], []
    for number, row in rows:
        image, mask = ((path.parent / cell.strip()).resolve() for cell in row[:2])
        for what, file in (("image", image), ("mask", mask)):
            if not file.is_file():
                raise InvalidInput(f"data.{split}.uri: {path} row {number}: {what} {file} does not exist")
        pairs.append((image, mask))
        folder = path.parent.resolve()
        names.append(image.relative_to(folder).as_posix() if image.is_relative_to(folder) else image.name)
    return pairs, names


@dataclass(frozen=True)
class FormatInfo:
    name: str
    read: Callable[[Path, str], tuple[list[Pair], list[str]]]


FORMATS: Registry[FormatInfo] = Registry("segmentation data format")
FORMATS.register(FormatInfo("segmentation-folder", read_folder))
FORMATS.register(FormatInfo("csv", read_csv))


def read_split(
    fmt: str, root: Path, split: str, *, labels: int, ignore_index: int, palette: Palette | None = None
) -> MaskedImages:
    pairs, names = FORMATS.get(fmt).read(root, split)
    base = root if root.is_dir() else root.parent
    return MaskedImages(base, split, tuple(pairs), tuple(names), labels, ignore_index, palette)


def hold_out(train: MaskedImages, fraction: float, seed: int) -> tuple[MaskedImages, MaskedImages]:
    """Split off ``fraction`` of the training split for validation, the same way on every rank."""
    kept, held = hold_out_indices(len(train), fraction, seed)
    return train.subset(kept, "train"), train.subset(held, "val")
