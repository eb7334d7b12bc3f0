"""Which objects a split needs from storage: its own prefix and, for layouts that keep files above or beside the
split, those too, mirrored under one local folder so the format's reader finds them where it looks on a disk.

Only yolo needs more than its prefix. The Ultralytics layout keeps ``data.yaml`` (the class names) above the
split, and in its ``images/<split>`` variant the labels in the twin folder ``labels/<split>``:

- ``root/train/{images,labels}/`` with ``root/data.yaml``: the split URI is ``root/train``;
- ``root/{images,labels}/train/`` with ``root/data.yaml``: the split URI is ``root/images/train``.

The reader (kiln.trainer.tasks.detection_formats) and staging both take these paths from here, so the folders
staged are the folders read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePosixPath

DATA_YAML = "data.yaml"
IMAGES, LABELS = "images", "labels"


@dataclass(frozen=True)
class SplitLayout:
    """What to stage for a split, relative to ``anchor``: the split's own folder ``split`` ('' when the anchor
    is the split), other ``prefixes`` the split cannot be read without, and single ``files`` taken when present."""

    anchor: str  # a URI: the split's, or a folder above it
    split: str = ""
    prefixes: tuple[str, ...] = ()
    files: tuple[str, ...] = ()

    def uri(self, folder: str) -> str:
        """The URI of ``folder`` under the anchor."""
        return f"{self.anchor}/{folder}" if folder else self.anchor


def labels_twin(parts: tuple[str, ...]) -> tuple[str, ...] | None:
    """The labels folder of an images folder inside ``images/`` (``data/images/train`` -> ``data/labels/train``),
    as Ultralytics maps an image to its label file; None when no part is ``images``."""
    if IMAGES not in parts:
        return None
    cut = len(parts) - 1 - parts[::-1].index(IMAGES)
    return (*parts[:cut], LABELS, *parts[cut + 1 :])


def data_yaml_levels(images_twin: bool) -> int:
    """How many folders above the split root data.yaml may sit: the dataset root is one up from ``root/train``
    and two up from ``root/images/train``."""
    return 2 if images_twin else 1


def _bucket_and_parts(uri: str) -> tuple[str, tuple[str, ...]]:
    """(``s3://bucket``, the path's parts) of an S3 URI."""
    bucket, _, path = uri.removeprefix("s3://").rstrip("/").partition("/")
    return f"s3://{bucket}", tuple(part for part in path.split("/") if part)


def yolo_layout(uri: str) -> SplitLayout:
    """A yolo split: its labels twin when its path goes through ``images/``, and the data.yaml files the reader
    looks for above it, all under the dataset root."""
    bucket, parts = _bucket_and_parts(uri)
    twin = labels_twin(parts)
    levels = min(data_yaml_levels(twin is not None), len(parts))
    top = len(parts) - levels
    if twin is not None:
        top = min(top, len(parts) - 1 - parts[::-1].index(IMAGES))  # the labels twin lies under the anchor too
    split = PurePosixPath(*parts[top:])  # '.' when the URI is a bare bucket
    prefixes = (PurePosixPath(*twin[top:]).as_posix(),) if twin is not None else ()
    files = tuple((split.parents[level] / DATA_YAML).as_posix() for level in range(levels))
    return SplitLayout("/".join((bucket, *parts[:top])), "/".join(parts[top:]), prefixes, files)


def split_layout(uri: str, fmt: str) -> SplitLayout:
    """The layout of an ``s3://`` split in format ``fmt``: its prefix alone, except for yolo."""
    return yolo_layout(uri) if fmt == "yolo" else SplitLayout(uri)
