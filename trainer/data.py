"""Task-independent data plumbing: bringing a split to the node, decoding images, sampling and loading.

Task plugins parse their own formats (imagefolder, csv, masks, boxes) into datasets; this module gives them
a local path for each split and turns their datasets into DataLoaders that shard correctly under DDP.
"""

from __future__ import annotations

import csv
import math
import os
import random
from collections.abc import Callable, Iterator, Sized
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from kiln import storage
from kiln.api.data import DataSource
from kiln.api.resolve import ResolvedTrainingJob
from kiln.trainer.distributed import World, barrier
from kiln.trainer.errors import InvalidInput
from kiln.trainer.preemption import ignore_termination_in_worker
from kiln.trainer.split_layout import split_layout

# Every folder staged from storage in this process, mapped to the URI it mirrors: an error about a staged file
# names the object the user wrote (s3://...), not a path in this node's cache.
STAGED: dict[str, str] = {}
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
DEFAULT_CACHE = Path.home() / ".cache" / "kiln" / "data"


def _is_file_uri(uri: str) -> bool:
    """A URI naming one file (a csv or an annotations json) rather than a folder."""
    return Path(uri.rstrip("/")).suffix.lower() in {".csv", ".json"}


def cache_root(job: ResolvedTrainingJob) -> Path:
    configured = job.spec.data.staging.cache_dir or os.environ.get("KILN_CACHE_DIR")
    return Path(configured) if configured else DEFAULT_CACHE


def localize(source: DataSource, split: str, job: ResolvedTrainingJob, world: World) -> Path:
    """A local path for a split: S3 data is staged once per node into the cache (with what its layout keeps
    beside or above the split: kiln.trainer.split_layout), local paths are used in place."""
    uri = source.uri
    if not uri.startswith("s3://"):
        path = Path(uri.removeprefix("file://"))
        if not path.exists():
            raise InvalidInput(f"data.{split}.uri: {uri} does not exist")
        return path
    if job.spec.data.staging.mode == "direct":
        raise InvalidInput(f"data.staging.mode: direct reads local paths only; {uri} needs copy or auto")
    folder_uri, _, filename = uri.rstrip("/").rpartition("/") if _is_file_uri(uri) else (uri, "", "")
    layout = split_layout(folder_uri, source.format)
    dest = storage.cache_dir_for(folder_uri, cache_root(job))
    STAGED[str(dest)] = layout.anchor  # dest mirrors the anchor: dest/<x> holds <anchor>/<x>
    local = _stage(layout.uri(layout.split), dest / layout.split, split, job, world)
    for prefix in layout.prefixes:
        _stage(layout.uri(prefix), dest / prefix, split, job, world, needed_by=uri)
    if layout.files:
        _fetch_files(layout.anchor, layout.files, dest, split=split, job=job, world=world)
    path = local / filename if filename else local
    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
        raise InvalidInput(f"data.{split}.uri: {uri} holds no objects")
    return path


def as_source_uris(text: str) -> str:
    """``text`` with each staged folder's local path written as the URI it was staged from."""
    for local in sorted(STAGED, key=len, reverse=True):  # the longest first: one cache folder may hold another
        text = text.replace(local, STAGED[local])
    return text


def _stage(
    uri: str, dest: Path, split: str, job: ResolvedTrainingJob, world: World, *, needed_by: str | None = None
) -> Path:
    """Stage ``uri`` into ``dest`` once per node."""
    try:
        return storage.stage_once_per_node(
            uri,
            dest,
            job.spec.storage,
            local_rank=world.local_rank,
            wait=barrier,
            parallelism=job.spec.data.staging.parallelism,
        )
    except storage.EmptySourceError as exc:
        # Nothing to stage is a wrong URI, not an outage: retrying cannot help (exit 2, not 1).
        needs = f"{needed_by} needs {uri}, which" if needed_by else uri
        raise InvalidInput(f"data.{split}.uri: {needs} holds no objects") from exc
    except storage.NoSpaceError as exc:
        # Its own line already says what is short and where: exit 1, final unless 1 is a retriable exit code.
        raise storage.NoSpaceError(f"data.{split}.uri: {exc}") from exc
    except storage.StorageError as exc:
        raise storage.StorageError(f"data.{split}.uri: staging {uri} failed: {exc}") from exc


def _fetch_files(
    anchor: str, keys: tuple[str, ...], dest: Path, *, split: str, job: ResolvedTrainingJob, world: World
) -> None:
    """Single objects under ``anchor`` (yolo's data.yaml above the split) into ``dest``, by local rank 0, each
    run: one request per file keeps them current, and a file gone from storage is gone from the cache too."""
    if world.local_rank == 0:
        store = storage.open_store(anchor, job.spec.storage)
        for key in keys:
            try:
                if store.exists(key):
                    store.download_file(key, dest / key)
                else:
                    (dest / key).unlink(missing_ok=True)
            except storage.StorageError as exc:
                raise storage.StorageError(f"data.{split}.uri: fetching {store.url(key)} failed: {exc}") from exc
    barrier()


def load_image(path: Path) -> np.ndarray:
    """RGB uint8 HxWx3; a corrupt or unreadable file is an invalid-input error naming it."""
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise InvalidInput(f"corrupt or unreadable image {path}: {exc}") from exc


class ResumableDistributedSampler(DistributedSampler[Any]):
    """DistributedSampler (shuffled per ``set_epoch``) that can skip the batches a resumed epoch already did."""

    def __init__(self, dataset: Sized, world: World, *, seed: int, drop_last: bool) -> None:
        super().__init__(
            dataset,  # type: ignore[arg-type]
            num_replicas=world.world_size,
            rank=world.rank,
            shuffle=True,
            seed=seed,
            drop_last=drop_last,
        )
        self._skip = 0

    def set_epoch(self, epoch: int, skip_samples: int = 0) -> None:
        super().set_epoch(epoch)
        self._skip = skip_samples

    def __iter__(self) -> Iterator[int]:
        return iter(list(super().__iter__())[self._skip :])

    def __len__(self) -> int:
        return max(self.num_samples - self._skip, 0)


class ShardSampler(Sampler[int]):
    """Evaluation sharding without padding: rank r takes r, r+W, r+2W, ... so every sample counts once."""

    def __init__(self, size: int, world: World) -> None:
        self._indices = list(range(world.rank, size, world.world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices)

    def __len__(self) -> int:
        return len(self._indices)


Collate = Callable[[list[Any]], Any]


def _loader(
    dataset: Dataset[Any],
    sampler: Sampler[int],
    job: ResolvedTrainingJob,
    world: World,
    *,
    drop_last: bool,
    collate: Collate | None,
) -> DataLoader[Any]:
    workers = job.spec.data.workers
    return DataLoader(
        dataset,
        batch_size=job.spec.data.batch_size,
        sampler=sampler,
        collate_fn=collate,  # None: torch's default, which stacks tensors of one shape
        num_workers=workers,
        pin_memory=world.device.type == "cuda",
        drop_last=drop_last,
        persistent_workers=workers > 0,
        worker_init_fn=ignore_termination_in_worker,
        generator=torch.Generator().manual_seed(job.spec.seed + world.rank),
    )


def train_loader(
    dataset: Dataset[Any], job: ResolvedTrainingJob, world: World, *, drop_last: bool = False,
    collate: Collate | None = None,
) -> tuple[DataLoader[Any], ResumableDistributedSampler]:  # fmt: skip
    size = len(dataset)  # type: ignore[arg-type]
    per_rank = math.ceil(size / world.world_size)
    drop_last = drop_last and per_rank >= job.spec.data.batch_size
    sampler = ResumableDistributedSampler(dataset, world, seed=job.spec.seed, drop_last=False)  # type: ignore[arg-type]
    return _loader(dataset, sampler, job, world, drop_last=drop_last, collate=collate), sampler


def eval_loader(
    dataset: Dataset[Any], job: ResolvedTrainingJob, world: World, *, collate: Collate | None = None
) -> DataLoader[Any]:
    sampler = ShardSampler(len(dataset), world)  # type: ignore[arg-type]
    return _loader(dataset, sampler, job, world, drop_last=False, collate=collate)


def csv_rows(path: Path, split: str, header: tuple[str, str]) -> tuple[Path, list[tuple[int, list[str]]]]:
    """(the CSV file, its numbered data rows) for a ``csv`` split: ``path`` is the file, or a folder holding
    exactly one. A first row equal to ``header`` (case-insensitive) is skipped; every row has two cells."""
    if path.is_dir():
        candidates = sorted(path.glob("*.csv"))
        if len(candidates) != 1:
            raise InvalidInput(f"data.{split}.uri: {path} must hold exactly one .csv file, or name it")
        path = candidates[0]
    with path.open(newline="") as handle:
        rows = [row for row in csv.reader(handle) if row]
    if rows and [cell.strip().lower() for cell in rows[0][:2]] == list(header):
        rows = rows[1:]
    if not rows:
        raise InvalidInput(f"data.{split}.uri: {path} has no rows")
    for number, row in enumerate(rows, start=1):
        if len(row) < 2:
            raise InvalidInput(f"data.{split}.uri: {path} row {number} is not {','.join(header)}")
    return path, list(enumerate(rows, start=1))


def hold_out_indices(count: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, val indices): ``fraction`` of ``count`` items held out for data.valSplit, chosen the
    same way on every rank (a seeded shuffle), each list sorted."""
    order = list(range(count))
    random.Random(seed).shuffle(order)
    cut = max(1, round(count * fraction))
    if cut >= count:
        raise InvalidInput(f"data.valSplit: {fraction} leaves no training images out of {count}")
    return sorted(order[cut:]), sorted(order[:cut])
