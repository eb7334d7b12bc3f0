"""Staging: copy a dataset prefix into a node-local cache once, in parallel, resumably and verified.

The cache directory holds the files under their keys plus two bookkeeping files:

- ``.kiln-staged.json``, the marker: the source URI and a digest of its listing (count, bytes, keys, sizes,
  ETags), with ``complete`` false while staging runs and true once every file is verified;
- ``.lock``, which local ranks take with ``flock`` so only one of them downloads.

A call with a complete marker that matches the current listing costs one listing and a ``stat`` per file.
A marker with a different digest means the data changed at the source: the cache is emptied and staged
again. Without a complete marker, files already present with the listed size are kept (a resumed
staging) and the rest are downloaded; in-flight temporaries left by a crash are deleted.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from urllib.parse import urlsplit

from kiln.api.training import StorageSpec
from kiln.storage.base import (
    NO_SPACE_ERRNOS,
    TMP_SUFFIX,
    EmptySourceError,
    LocalStore,
    NoSpaceError,
    ObjectInfo,
    StorageError,
    Store,
    atomic_path,
    check_key,
)
from kiln.storage.s3 import DEFAULT_POOL, TRANSFER_THREADS, S3Store

log = logging.getLogger(__name__)

MARKER = ".kiln-staged.json"
LOCK = ".lock"
MARKER_VERSION = 1
DEFAULT_CACHE_ROOT = Path("~/.cache/kiln/data")

Progress = Callable[[int, int], None]
"""progress(files_done, files_total): called once with the files already present, then after each
download, always from the calling thread."""


@dataclass(frozen=True)
class Manifest:
    """What a staged copy was made from: enough to tell whether the source changed since."""

    uri: str
    count: int
    bytes: int
    digest: str
    complete: bool = False

    @classmethod
    def of(cls, uri: str, listing: Sequence[ObjectInfo]) -> Manifest:
        sha = hashlib.sha256()
        for info in listing:
            sha.update(f"{info.key}\t{info.size}\t{info.etag}\n".encode())
        return cls(uri, len(listing), sum(info.size for info in listing), sha.hexdigest())

    def same_source(self, other: Manifest) -> bool:
        return (self.uri, self.count, self.bytes, self.digest) == (other.uri, other.count, other.bytes, other.digest)


def source_id(uri: str) -> str:
    """A canonical spelling of a source URI: no trailing '/', local paths absolute."""
    parts = urlsplit(uri)
    if parts.scheme == "s3":
        return uri.rstrip("/")
    path = parts.path if parts.scheme == "file" else uri
    return str(Path(path).expanduser().absolute())


def cache_dir_for(uri: str, root: Path | None = None) -> Path:
    """A stable per-URI folder under the cache root ($KILN_CACHE_DIR, else ~/.cache/kiln/data).

    The name is a readable tail of the URI plus a short hash of all of it, so two prefixes that end
    alike never share a folder: ``s3://data/imagenet/train`` -> ``imagenet-train-1a2b3c4d5e6f``.
    """
    if root is None:
        root = Path(os.environ.get("KILN_CACHE_DIR") or DEFAULT_CACHE_ROOT)
    source = source_id(uri)
    digest = hashlib.sha256(source.encode()).hexdigest()[:12]
    tail = "-".join(source.removeprefix("s3://").strip("/").split("/")[-2:])
    readable = re.sub(r"[^A-Za-z0-9._-]+", "-", tail)[-40:].strip("-.")
    return root.expanduser().absolute() / (f"{readable}-{digest}" if readable else digest)


def read_marker(dest: Path) -> Manifest | None:
    try:
        data = json.loads((dest / MARKER).read_text())
    except (OSError, ValueError):
        return None  # missing or unreadable: never staged; files of the right size are still kept
    if data.get("version") != MARKER_VERSION:
        return None
    data.pop("version")
    try:
        return Manifest(**data)
    except TypeError:
        return None


def _write_marker(dest: Path, manifest: Manifest) -> None:
    with atomic_path(dest / MARKER) as tmp:
        tmp.write_text(json.dumps({"version": MARKER_VERSION, **asdict(manifest)}, indent=1))


def is_staged(dest: Path, uri: str) -> bool:
    """Whether ``dest`` holds a complete, verified copy of ``uri`` (by its marker alone, no listing)."""
    marker = read_marker(dest)
    return marker is not None and marker.complete and marker.uri == source_id(uri)


def stage(
    uri: str,
    dest: Path,
    storage: StorageSpec | None = None,
    *,
    parallelism: int = 16,
    progress: Progress | None = None,
) -> Path:
    """Download everything under ``uri`` (s3:// or local) into ``dest`` and return ``dest``.

    Parallel (``parallelism`` files at a time), resumable (files present with the listed size are kept),
    verified (every listed file must be there with its listed size, else StorageError) and marked, so a
    second call downloads nothing. An empty prefix is a StorageError.
    """
    store = _open_source(uri, storage, parallelism)
    listing = store.list()
    if not listing:
        raise EmptySourceError(f"{store.uri}: no objects under this prefix")
    _check_keys(store.uri, listing)
    manifest = Manifest.of(source_id(uri), listing)
    dest.mkdir(parents=True, exist_ok=True)

    previous = read_marker(dest)
    if previous is not None and not previous.same_source(manifest):
        _empty(dest)  # the source changed since: files of the same size may still be stale
        previous = None
    todo = _missing(dest, listing)
    if previous is not None and previous.complete and not todo:
        log.info("%s: already staged in %s (%d files)", store.uri, dest, manifest.count)
        if progress:
            progress(len(listing), len(listing))
        return dest

    try:
        _write_marker(dest, manifest)
        _remove_temporaries(dest)
        if _needed_bytes(dest, todo) > _free_bytes(dest):  # fail before filling a disk other jobs may share
            raise _no_space(store.uri, dest, listing)
        _download_all(store, dest, todo, parallelism, progress, total=len(listing))
        _verify(store.uri, dest, listing)
        _write_marker(dest, replace(manifest, complete=True))
    except NoSpaceError:
        raise _no_space(store.uri, dest, listing) from None
    except OSError as exc:  # the marker or a folder, written by this module itself
        if exc.errno in NO_SPACE_ERRNOS:
            raise _no_space(store.uri, dest, listing) from None
        raise
    log.info(
        "%s: staged in %s (%d files, %.1f MB; %d downloaded)",
        store.uri,
        dest,
        manifest.count,
        manifest.bytes / 1e6,
        len(todo),
    )
    return dest


def _needed_bytes(dest: Path, todo: Sequence[ObjectInfo]) -> int:
    """What the files still to download take on ``dest``'s filesystem: every file fills whole blocks."""
    block = max(1, os.statvfs(dest).f_frsize)
    return sum(-(-info.size // block) * block for info in todo)


def _free_bytes(dest: Path) -> int:
    stats = os.statvfs(dest)
    return stats.f_bavail * stats.f_frsize


def _no_space(uri: str, dest: Path, listing: Sequence[ObjectInfo]) -> NoSpaceError:
    """A one-line error saying how much the cache lacks, for a cache that is too small or full."""
    total = sum(info.size for info in listing)
    still = sum(info.size for info in _missing(dest, listing))
    return NoSpaceError(
        f"{uri}: no space left for the staging cache on {_mount_point(dest)}: {_mb(still)} of {_mb(total)} still"
        f" to stage, {_mb(_free_bytes(dest))} free there; give the cache more room (data.staging.cacheClaim, or the"
        " node's ephemeral storage for the default emptyDir) or stage less (the staged part is kept)"
    )


def _mount_point(path: Path) -> Path:
    """The mount point of the filesystem holding ``path``: the volume that is full. (Never the cache folder
    itself, which the trainer's messages rewrite to the URI it mirrors.)"""
    while not path.is_mount() and path != path.parent:
        path = path.parent
    return path


def _mb(size: int) -> str:
    """A size people read at a glance: 12.3 kB, 812.3 MB, 1.2 GB."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size / 1e3:.1f} kB"


def _open_source(uri: str, storage: StorageSpec | None, parallelism: int) -> Store:
    if urlsplit(uri).scheme == "s3":
        # Every parallel download and every multipart thread needs its own pooled connection.
        return S3Store.from_uri(uri, storage, pool=max(DEFAULT_POOL, parallelism + TRANSFER_THREADS))
    root = Path(source_id(uri))
    if not root.is_dir():  # LocalStore would create it, and a typo would then read as an empty dataset
        raise StorageError(f"{uri}: no such directory")
    return LocalStore(root)


def _check_keys(uri: str, listing: Sequence[ObjectInfo]) -> None:
    # A key like '../x' would escape the cache, and the bookkeeping files must not be overwritten.
    for info in listing:
        check_key(info.key)
        if info.key in (MARKER, LOCK):
            raise StorageError(f"{uri}/{info.key}: this name is reserved by the staging cache")


def _missing(dest: Path, listing: Sequence[ObjectInfo]) -> list[ObjectInfo]:
    """The listed files that are absent from ``dest`` or have another size."""
    return [info for info in listing if _local_size(dest / info.key) != info.size]


def _local_size(path: Path) -> int | None:
    try:
        return path.stat().st_size if path.is_file() else None
    except OSError:
        return None


def _empty(dest: Path) -> None:
    for entry in dest.iterdir():
        if entry.name == LOCK:
            continue  # other ranks may be blocked on it
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def _remove_temporaries(dest: Path) -> None:
    # Leftovers of downloads that a crash interrupted; their final names were never written.
    for dirpath, _dirs, files in os.walk(dest):
        for name in files:
            if name.endswith(TMP_SUFFIX):
                Path(dirpath, name).unlink(missing_ok=True)


def _download_all(
    store: Store,
    dest: Path,
    todo: Sequence[ObjectInfo],
    parallelism: int,
    progress: Progress | None,
    *,
    total: int,
) -> None:
    done = total - len(todo)
    if progress:
        progress(done, total)
    if not todo:
        return
    pool = ThreadPoolExecutor(max_workers=max(1, parallelism), thread_name_prefix="kiln-stage")
    try:
        futures = [pool.submit(_fetch, store, info, dest) for info in todo]
        for future in as_completed(futures):
            future.result()
            done += 1
            if progress:
                progress(done, total)
    finally:
        # On the first failure (or an interrupt) drop the queued downloads instead of finishing them.
        pool.shutdown(wait=True, cancel_futures=True)


def _fetch(store: Store, info: ObjectInfo, dest: Path) -> None:
    path = dest / info.key
    if isinstance(store, S3Store):
        store.download_sized(info.key, path, info.size)
    else:
        store.download_file(info.key, path)


def _verify(uri: str, dest: Path, listing: Sequence[ObjectInfo]) -> None:
    wrong = [(info, _local_size(dest / info.key)) for info in listing]
    wrong = [(info, size) for info, size in wrong if size != info.size]
    if wrong:
        info, size = wrong[0]
        raise StorageError(
            f"{uri}: staged copy in {dest} does not match the listing: {len(wrong)} of {len(listing)} files"
            f" differ, e.g. {info.key} has {size} bytes, expected {info.size} (did the source change?)"
        )


@contextmanager
def node_lock(dest: Path) -> Iterator[None]:
    """Hold an exclusive flock on ``dest/.lock``; blocks while another process holds it."""
    dest.mkdir(parents=True, exist_ok=True)
    fd = os.open(dest / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def stage_once_per_node(
    uri: str,
    dest: Path,
    storage: StorageSpec | None = None,
    *,
    local_rank: int,
    wait: Callable[[], None] | None = None,
    parallelism: int = 16,
    progress: Progress | None = None,
) -> Path:
    """Stage ``uri`` into ``dest`` once per node, for processes started by torchrun; returns ``dest``.

    Local rank 0 stages under the file lock ``dest/.lock``. The other ranks either

    - with ``wait`` (a barrier every local rank calls, such as ``torch.distributed.barrier``): call it,
      then trust rank 0's marker without touching the source. Rank 0 calls ``wait`` after staging. The
      barrier's timeout must cover the staging time, and a failure on rank 0 leaves the others to
      torchrun, which stops the whole group;
    - without ``wait``: block on the lock, then run :func:`stage`, which finds the marker and downloads
      nothing (one listing each). Whichever rank gets the lock first downloads, so exactly one does.
    """
    if local_rank != 0 and wait is not None:
        wait()
        if not is_staged(dest, uri):
            raise StorageError(f"{uri}: local rank 0 finished without staging it into {dest}")
        return dest
    with node_lock(dest):
        stage(uri, dest, storage, parallelism=parallelism, progress=progress)
    if wait is not None:
        wait()
    return dest
