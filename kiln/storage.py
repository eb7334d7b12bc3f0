"""Object storage behind one small contract: a local directory or an S3 bucket/prefix.

``open_store(uri, storage)`` returns a :class:`Store` rooted at ``uri``. Keys are relative to that root and
'/'-separated. Both backends give the same guarantees: writes are atomic (a reader sees the old object or
the new one, never a partial one), listings are recursive and sorted, and every failure is a one-line
:class:`StorageError` that names the URI and the reason, never a credential.

Staging whole prefixes onto a node lives in :mod:`kiln.staging`; its public names are re-exported here.

boto3 is imported only when an ``s3://`` store is opened, so local stores work without the trainer extra.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable
from urllib.parse import urlsplit

from kiln.api.training import StorageSpec

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

    from kiln.staging import cache_dir_for, stage, stage_once_per_node

__all__ = [
    "LocalStore",
    "ObjectInfo",
    "ObjectNotFoundError",
    "S3Store",
    "StorageError",
    "Store",
    "cache_dir_for",
    "open_store",
    "stage",
    "stage_once_per_node",
]

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


def _check_prefix(prefix: str) -> str:
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

    def download_file(self, key: str, path: Path) -> None:
        # The destination is a node-local cache that can be rebuilt, so skip the fsyncs.
        with self._errors(key), atomic_path(path, durable=False) as tmp:
            shutil.copyfile(self._path(key), tmp)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        base = self.root / _check_prefix(prefix).rpartition("/")[0]
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
    return StorageError(f"{where}: {reason}")


# Client settings. An unreachable endpoint must fail fast instead of hanging a pod: 3 attempts with a
# 5 s connect timeout plus standard-mode backoff (jittered, at most 2^attempt s) stay under ~25 s.
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 60.0
MAX_ATTEMPTS = 3
# Multipart parameters match boto3's defaults (8 MiB parts, 10 threads per transfer), which S3 and
# MinIO handle well; the pool must hold every transfer thread plus staging's parallel downloads.
MULTIPART_BYTES = 8 * 1024 * 1024
TRANSFER_THREADS = 10
DEFAULT_POOL = 32
_CONNECTION_ERRORS = (
    "EndpointConnectionError",
    "ConnectTimeoutError",
    "ConnectionClosedError",
    "ReadTimeoutError",
    "ProxyConnectionError",
)


def resolve_endpoint(storage: StorageSpec | None) -> str | None:
    """The spec's endpoint, else the AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL environment, else AWS."""
    if storage is not None and storage.endpoint_url:
        return storage.endpoint_url
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def make_s3_client(endpoint_url: str | None, region: str | None, *, pool: int = DEFAULT_POOL) -> S3Client:
    """A boto3 S3 client on the standard credential chain with bounded retries and timeouts."""
    import boto3
    import botocore.session
    from botocore.config import Config

    config = Config(
        connect_timeout=CONNECT_TIMEOUT_S,
        read_timeout=READ_TIMEOUT_S,
        retries={"mode": "standard", "max_attempts": MAX_ATTEMPTS},
        max_pool_connections=pool,
        # S3-compatible servers (MinIO, Ceph) are addressed by path, not by bucket subdomain.
        s3={"addressing_style": "path"} if endpoint_url else None,
        # Checksums keep boto3's default (CRC32 trailers, which also spare the SHA-256 of the payload
        # over plain HTTP). A server that rejects them: AWS_REQUEST_CHECKSUM_CALCULATION=when_required.
    )
    with _SESSION_LOCK:
        # A new session per client re-reads the credential chain (boto3's default session would cache
        # the first credentials it found); only the parsed service models are shared.
        core = botocore.session.Session()
        core.register_component("data_loader", _shared_loader())
        session = boto3.session.Session(botocore_session=core)
        # boto3 appends its data folder to the loader's search paths on every session: keep one copy.
        paths = _shared_loader().search_paths
        paths[:] = list(dict.fromkeys(paths))
        return session.client("s3", endpoint_url=endpoint_url, region_name=region, config=config)


_SESSION_LOCK = threading.Lock()


@functools.cache
def _shared_loader() -> Any:
    """botocore's service-model loader, shared: parsing S3's models anew cost 0.2-0.4 s per store."""
    import botocore.loaders

    return botocore.loaders.create_loader()


class S3Store:
    """``s3://bucket/prefix``. Keys map to ``prefix/key``; large files go through managed multipart."""

    page_size = 1000
    """Keys per LIST request: S3's maximum. Tests lower it to exercise pagination."""

    def __init__(self, bucket: str, prefix: str, client: S3Client) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.uri = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self.client = client
        self.endpoint = client.meta.endpoint_url

    @classmethod
    def from_uri(cls, uri: str, storage: StorageSpec | None = None, *, pool: int = DEFAULT_POOL) -> S3Store:
        parts = urlsplit(uri)
        if not parts.netloc or parts.query or parts.fragment:
            raise StorageError(f"{uri}: not an S3 URI; expected s3://bucket/prefix")
        client = make_s3_client(resolve_endpoint(storage), storage.region if storage else None, pool=pool)
        return cls(parts.netloc, parts.path, client)

    def __repr__(self) -> str:
        # Only the location: the client (and so the credentials) stays out of reprs and logs.
        return f"S3Store({self.uri!r}, endpoint={scrub(self.endpoint)!r})"

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{check_key(key)}" if self.prefix else check_key(key)

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}" if key else self.uri

    @contextmanager
    def _errors(self, where: str, *, listing: bool = False) -> Iterator[None]:
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except (BotoCoreError, ClientError, Boto3Error) as exc:
            # 'from None': the summary says what happened; the chained botocore error adds request
            # details that should not travel into logs.
            raise _s3_error(where, self.endpoint, exc, listing=listing) from None

    def read_bytes(self, key: str) -> bytes:
        with self._errors(self.url(key)):
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()

    def write_bytes(self, key: str, data: bytes) -> None:
        # A single PUT is atomic on S3: readers see the old object until it completes.
        with self._errors(self.url(key)):
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def upload_file(self, key: str, path: Path) -> None:
        # A multipart upload becomes visible only when CompleteMultipartUpload succeeds, so it is atomic.
        if not path.is_file():
            raise ObjectNotFoundError(f"{path}: no such local file to upload")
        with self._errors(self.url(key)):
            self.client.upload_file(str(path), self.bucket, self._key(key), Config=_transfer_config())

    def download_file(self, key: str, path: Path) -> None:
        self.download_sized(key, path, size=None)

    def download_sized(self, key: str, path: Path, size: int | None) -> None:
        """Download to a temporary sibling, then rename. A known small ``size`` skips the transfer
        manager (its threads cost more than the object for the many small files of a dataset)."""
        try:
            with self._errors(self.url(key)), atomic_path(path, durable=False) as tmp, tmp.open("wb") as out:
                if size is not None and size < MULTIPART_BYTES:
                    body = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
                    shutil.copyfileobj(body, out, 1024 * 1024)
                else:
                    self.client.download_fileobj(self.bucket, self._key(key), out, Config=_transfer_config())
        except StorageError:
            raise  # ObjectNotFoundError is an OSError too
        except OSError as exc:  # the local side: disk full, permissions
            raise StorageError(f"{self.url(key)} -> {path}: {exc.strerror or type(exc).__name__}") from None

    def exists(self, key: str) -> bool:
        try:
            with self._errors(self.url(key)):
                self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ObjectNotFoundError:
            return False
        return True

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        root = f"{self.prefix}/" if self.prefix else ""
        found = []
        with self._errors(self.uri, listing=True):
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket,
                Prefix=root + _check_prefix(prefix),
                PaginationConfig={"PageSize": self.page_size},
            )
            for page in pages:
                for obj in page.get("Contents", []):
                    key = obj["Key"][len(root) :]
                    # Zero-byte 'folder/' markers made by consoles are not files.
                    if key and not key.endswith("/"):
                        found.append(ObjectInfo(key, obj["Size"], etag=obj.get("ETag", "").strip('"')))
        return sorted(found, key=lambda info: info.key)

    def delete(self, key: str) -> None:
        with self._errors(self.url(key)):
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def delete_prefix(self, prefix: str) -> None:
        root = f"{self.prefix}/" if self.prefix else ""
        keys = [root + info.key for info in self.list(prefix)]  # listed keys need no re-validation
        with self._errors(f"{self.uri}/{prefix}"):
            for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
                batch = keys[start : start + 1000]
                reply = self.client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True}
                )
                if errors := reply.get("Errors"):
                    first = errors[0]
                    raise StorageError(
                        f"s3://{self.bucket}/{first.get('Key')}: delete failed: {first.get('Code')}:"
                        f" {first.get('Message')} ({len(errors)} objects not deleted)"
                    )


def _transfer_config() -> Any:
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(
        multipart_threshold=MULTIPART_BYTES, multipart_chunksize=MULTIPART_BYTES, max_concurrency=TRANSFER_THREADS
    )


def _s3_error(where: str, endpoint: str, exc: BaseException, *, listing: bool = False) -> StorageError:
    """Translate a boto3/botocore exception into a one-line StorageError."""
    from botocore.exceptions import ClientError, NoCredentialsError, PartialCredentialsError

    if type(exc).__name__ in _CONNECTION_ERRORS:
        return StorageError(f"{where}: cannot reach endpoint {endpoint}: {_connection_reason(exc)}")
    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return StorageError(
            f"{where}: no S3 credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
            " (storage.secretRef) or give the pod a role"
        )
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        if code in ("NoSuchKey", "404", "NotFound"):
            if listing:  # a bare 404 on a bucket URL: no bucket there, or no S3 server at all
                return StorageError(f"{where}: not found at {endpoint}: no such bucket, or not an S3 endpoint")
            return ObjectNotFoundError(f"{where}: no such object")
        if code == "NoSuchBucket":
            return StorageError(f"{where}: no such bucket")
        if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return StorageError(f"{where}: access denied ({code}); check the credentials and bucket policy")
        return StorageError(f"{where}: {code}: {error.get('Message', exc)}")
    # boto3 wraps transfer failures (S3UploadFailedError) around the botocore error that caused them.
    cause = exc.__cause__ or exc.__context__
    if cause is not None and cause is not exc:
        return _s3_error(where, endpoint, cause, listing=listing)
    return StorageError(f"{where}: {type(exc).__name__}: {exc}")


def _connection_reason(exc: BaseException) -> str:
    # botocore's message repeats the request URL; the socket error underneath is what explains it.
    inner = getattr(exc, "kwargs", {}).get("error")
    text = str(inner if inner is not None else exc)
    if errno_text := re.search(r"\[Errno -?\d+\] [^'\")]+", text):
        return errno_text.group(0)
    if type(exc).__name__ == "ConnectTimeoutError":
        return f"no connection after {MAX_ATTEMPTS} attempts of {CONNECT_TIMEOUT_S:g} s"
    if type(exc).__name__ == "ReadTimeoutError":
        return f"no response after {MAX_ATTEMPTS} attempts of {READ_TIMEOUT_S:g} s"
    return re.sub(r"<[^>]*>,?", "", text).strip("()' ") or type(exc).__name__


def open_store(uri: str, storage: StorageSpec | None = None) -> Store:
    """``s3://bucket/prefix`` gives an S3Store; ``file:///x``, ``/abs`` and ``./rel`` a LocalStore.

    S3 credentials come from boto3's standard chain (environment, config files, IRSA, instance
    metadata); ``storage`` adds the endpoint and region. A local directory is created if missing.
    """
    scheme = urlsplit(uri).scheme
    if scheme == "s3":
        return S3Store.from_uri(uri, storage)
    if scheme == "file":
        return LocalStore(Path(urlsplit(uri).path))
    if scheme:
        raise StorageError(f"{uri}: unsupported scheme {scheme!r}; use s3://bucket/prefix or a local path")
    return LocalStore(Path(uri))


def __getattr__(name: str) -> Any:
    # Re-exports resolved on first use (PEP 562), because kiln.staging imports this module.
    if name in ("stage", "stage_once_per_node", "cache_dir_for"):
        import kiln.staging

        return getattr(kiln.staging, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
