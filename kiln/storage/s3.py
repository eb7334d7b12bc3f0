"""The S3 backend of :mod:`kiln.storage`: ``s3://bucket/prefix`` through boto3, on any S3-compatible server.

boto3 is imported inside the functions that need it, only once an ``s3://`` store is opened, so importing this
module (and :mod:`kiln.storage`) works without boto3 (the trainer extra).
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from kiln.api.training import StorageSpec
from kiln.storage.base import (
    NO_SPACE_ERRNOS,
    NoSpaceError,
    ObjectInfo,
    ObjectNotFoundError,
    StorageError,
    atomic_path,
    check_key,
    check_prefix,
    scrub,
)

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client


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
        # total_max_attempts counts the first try; botocore's 'max_attempts' key counts only the retries.
        retries={"mode": "standard", "total_max_attempts": MAX_ATTEMPTS},
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
            error = NoSpaceError if exc.errno in NO_SPACE_ERRNOS else StorageError
            raise error(f"{self.url(key)} -> {path}: {exc.strerror or type(exc).__name__}") from None

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
                Prefix=root + check_prefix(prefix),
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
            " (storage.secretRef; locally also ~/.aws)"
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
