"""The base of :mod:`kiln.storage`: the :class:`Store` contract, :class:`LocalStore`, errors and key rules.

``kiln.storage.open_store(uri, storage)`` returns a :class:`Store` rooted at ``uri``. Keys are relative to
that root and '/'-separated. Both backends give the same guarantees: writes are atomic (a reader sees the old
object or the new one, never a partial one), listings are recursive and sorted, and every failure is a
one-line :class:`StorageError` that names the URI and the reason, never a credential.

This module is the bottom of the package: :mod:`kiln.storage.s3` and :mod:`kiln.storage.staging` import it,
and it imports neither; ``open_store`` itself lives in the package ``__init__``, which sees both backends.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable
from urllib.parse import urlsplit

# Suffix of in-flight files. Listings hide them and staging deletes leftovers, so a crash mid-write never
# surfaces a partial object under its real name.
TMP_SUFFIX = ".kiln-tmp"

# Environment variables whose values must never reach a message, a repr or a log line.
# (The access key ID is an identifier, not a secret, and is often a short word like 'minio'.)
_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
_MAX_MESSAGE = 600


class StorageError(Exception):
    """A storage operation failed. The message is one line: '<uri>: <reason>', with no credentials."""

    def __init__(self, message: str) -> None:
        super().__init__(scrub(message))


class ObjectNotFoundError(StorageError, FileNotFoundError):
    """The key does not exist. Also a FileNotFoundError, so ``except FileNotFoundError`` works too."""


class EmptySourceError(StorageError):
    """A prefix to stage lists no objects: a wrong URI, which no retry will fix."""


class NoSpaceError(StorageError):
    """The local filesystem is full (ENOSPC) or the user's quota is spent (EDQUOT)."""


NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def scrub(text: str) -> str:
    """One line, no secrets: drop credential values from the environment and user:password@ in URLs."""
    for name in _SECRET_ENV:
        value = os.environ.get(name, "")
        if len(value) >= 8:  # shorter values would mangle ordinary words; real secrets are longer
            text = text.replace(value, "***")
    text = re.sub(r"(\w+://)[^/@\s]+@", r"\1***@", text)
    text = " ".join(text.split())
    return text if len(text) <= _MAX_MESSAGE else text[:_MAX_MESSAGE] + "..."


@dataclass(frozen=True)
class ObjectInfo:
    """One object under a store: its key relative to the store root, and its size in bytes."""

    key: str
    size: int
    etag: str = field(default="", compare=False)
    """A change token: the S3 ETag, or the local file's inode and mtime. Staging uses it to notice a
    changed source; equality ignores it."""


@runtime_checkable
class Store(Protocol):
    """A bucket/prefix or a directory. Keys are relative, '/'-separated, without '.' or '..' segments."""

    uri: str

    def url(self, key: str) -> str:
        """The full URI of ``key``; the root's URI for an empty key."""

    def read_bytes(self, key: str) -> bytes:
        """The object's content; ObjectNotFoundError if it is missing."""

    def write_bytes(self, key: str, data: bytes) -> None:
        """Replace the object atomically."""

    def upload_file(self, key: str, path: Path) -> None:
        """Copy a local file to ``key`` atomically (S3: managed multipart transfer)."""

    def download_file(self, key: str, path: Path) -> None:
        """Copy ``key`` to a local file through a temporary name, so ``path`` is never partial."""

    def exists(self, key: str) -> bool:
        """Whether the object exists."""

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        """Every object whose key starts with ``prefix``, recursively, sorted by key."""

    def delete(self, key: str) -> None:
        """Delete the object; a missing one is fine."""

    def delete_prefix(self, prefix: str) -> None:
        """Delete every object whose key starts with ``prefix`` (end it with '/' to mean a folder)."""


def check_key(key: str) -> str:
    """Keys must stay inside the root: relative, no empty, '.' or '..' segments. Returns ``key``."""
    if not key or key.startswith("/") or "\0" in key or any(p in ("", ".", "..") for p in key.split("/")):
        raise StorageError(f"{key!r}: invalid key: keys are relative '/'-separated paths without '.' or '..'")
    return key


def check_prefix(prefix: str) -> str:
    # A prefix may end with '/' (a folder) or be empty (everything); otherwise it obeys the key rules.
    if prefix:
        check_key(prefix.rstrip("/") or "/")
    return prefix


def _temp_sibling(path: Path) -> Path:
    # Truncated so that a name near the 255-byte limit still leaves room for the suffixes.
    return path.with_name(f".{path.name[:200]}.{uuid.uuid4().hex[:8]}{TMP_SUFFIX}")


def _fsync_dir(path: Path) -> None:
    # The rename is durable only once the directory entry is on disk.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: Path, *, durable: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; on success fsync it and rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(path)
    try:
        yield tmp
        if durable:
            with tmp.open("rb+") as f:
                os.fsync(f.fileno())
        tmp.replace(path)
        if durable:
            _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


class LocalStore:
    """A directory. Writes go to a hidden temporary sibling, are fsynced, then renamed into place."""

    def __init__(self, root: Path) -> None:
        self.root = root.expanduser().absolute()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _local_error(str(self.root), exc) from None
        self.uri = str(self.root)

    def __repr__(self) -> str:
        return f"LocalStore({self.uri!r})"

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def url(self, key: str) -> str:
        return str(self._path(key)) if key else self.uri

    @contextmanager
    def _errors(self, key: str) -> Iterator[None]:
        try:
            yield
        except StorageError:
            raise
        except OSError as exc:
            raise _local_error(self.url(key), exc) from None

    def read_bytes(self, key: str) -> bytes:
        with self._errors(key):
            return self._path(key).read_bytes()

    def write_bytes(self, key: str, data: bytes) -> None:
        with self._errors(key), atomic_path(self._path(key)) as tmp:
            tmp.write_bytes(data)

    def upload_file(self, key: str, path: Path) -> None:
        with self._errors(key), atomic_path(self._path(key)) as tmp:
            shutil.copyfile(path, tmp)

    def write_with(self, key: str, write: Callable[[Path], None]) -> None:
        """``write`` fills the temporary sibling, which is then fsynced and renamed into place, as every write
        here is: a large file (a checkpoint) is written once instead of written elsewhere and copied."""
        with self._errors(key), atomic_path(self._path(key)) as tmp:
            write(tmp)

    def download_file(self, key: str, path: Path) -> None:
        # The destination is a node-local cache that can be rebuilt, so skip the fsyncs.
        with self._errors(key), atomic_path(path, durable=False) as tmp:
            shutil.copyfile(self._path(key), tmp)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        base = self.root / check_prefix(prefix).rpartition("/")[0]
        found = []
        for dirpath, _dirs, files in os.walk(base):
            for name in files:
                key = Path(dirpath, name).relative_to(self.root).as_posix()
                if key.startswith(prefix) and not name.endswith(TMP_SUFFIX) and (info := self._info(key)):
                    found.append(info)
        return sorted(found, key=lambda info: info.key)

    def _info(self, key: str) -> ObjectInfo | None:
        try:
            stat = (self.root / key).stat()
        except FileNotFoundError:
            return None  # deleted while the tree was walked
        # Every write renames a new file into place, so the inode changes even when two writes land
        # within one tick of the file-system clock.
        return ObjectInfo(key, stat.st_size, etag=f"{stat.st_ino}-{stat.st_mtime_ns}")

    def delete(self, key: str) -> None:
        with self._errors(key):
            self._path(key).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> None:
        for info in self.list(prefix):
            self.delete(info.key)
        self._prune_empty_dirs(self.root / prefix.rpartition("/")[0])

    def _prune_empty_dirs(self, base: Path) -> None:
        # Folders only exist to hold files; leaving empty ones would make 'exists' and 'list' disagree
        # with S3 for anyone who walks the tree directly.
        for dirpath, _dirs, _files in os.walk(base, topdown=False):
            path = Path(dirpath)
            if path != self.root:
                with suppress(OSError):  # not empty
                    path.rmdir()


def _local_error(where: str, exc: OSError) -> StorageError:
    reason = exc.strerror or type(exc).__name__
    if isinstance(exc, FileNotFoundError):
        return ObjectNotFoundError(f"{where}: no such object")
    if exc.errno in NO_SPACE_ERRNOS:
        return NoSpaceError(f"{where}: {reason}")
    return StorageError(f"{where}: {reason}")


def open_local_store(uri: str) -> LocalStore:
    """The non-S3 half of :func:`kiln.storage.open_store`: ``file:///x``, ``/abs`` or ``./rel``.

    A local directory is created if missing; any other scheme is a StorageError.
    """
    scheme = urlsplit(uri).scheme
    if scheme == "file":
        return LocalStore(Path(urlsplit(uri).path))
    if scheme:
        raise StorageError(f"{uri}: unsupported scheme {scheme!r}; use s3://bucket/prefix or a local path")
    return LocalStore(Path(uri))
