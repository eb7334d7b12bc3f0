"""Object storage behind one small contract: a local directory or an S3 bucket/prefix.

``open_store(uri, storage)`` returns a :class:`Store` rooted at ``uri``. Keys are relative to that root and
'/'-separated. Both backends give the same guarantees: writes are atomic (a reader sees the old object or
the new one, never a partial one), listings are recursive and sorted, and every failure is a one-line
:class:`StorageError` that names the URI and the reason, never a credential.

The package is layered, bottom up, with no cycle (an import-linter contract checks it):

- :mod:`kiln.storage.base`: the :class:`Store` protocol, :class:`LocalStore`, the errors, ``scrub``;
- :mod:`kiln.storage.s3`: :class:`S3Store`;
- :mod:`kiln.storage.staging`: copying whole prefixes onto a node (``stage``, ``stage_once_per_node``).

This ``__init__`` re-exports their public names and holds ``open_store``, the one function that sees both
backends. boto3 is imported only when an ``s3://`` store is opened, so local stores work without the
trainer extra.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from kiln.api.training import StorageSpec
from kiln.storage.base import (
    TMP_SUFFIX,
    EmptySourceError,
    LocalStore,
    NoSpaceError,
    ObjectInfo,
    ObjectNotFoundError,
    StorageError,
    Store,
    open_local_store,
    scrub,
)
from kiln.storage.s3 import S3Store
from kiln.storage.staging import cache_dir_for, stage, stage_once_per_node

__all__ = [
    "TMP_SUFFIX",
    "EmptySourceError",
    "LocalStore",
    "NoSpaceError",
    "ObjectInfo",
    "ObjectNotFoundError",
    "S3Store",
    "StorageError",
    "Store",
    "cache_dir_for",
    "open_store",
    "scrub",
    "stage",
    "stage_once_per_node",
]


def open_store(uri: str, storage: StorageSpec | None = None) -> Store:
    """``s3://bucket/prefix`` gives an S3Store; ``file:///x``, ``/abs`` and ``./rel`` a LocalStore.

    S3 credentials come from boto3's standard chain (environment, config files, IRSA, instance
    metadata); ``storage`` adds the endpoint and region. A local directory is created if missing.
    """
    if urlsplit(uri).scheme == "s3":
        return S3Store.from_uri(uri, storage)
    return open_local_store(uri)
