"""kiln.storage: both backends through one suite, against a real S3-protocol server for S3."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kiln.storage import (
    TMP_SUFFIX,
    LocalStore,
    ObjectInfo,
    ObjectNotFoundError,
    S3Store,
    StorageError,
    Store,
    open_store,
)
from kiln.testing.s3 import S3Server

BIG = 9 * 1024 * 1024 + 123  # above the 8 MiB multipart threshold, and not a whole number of parts


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param == "local":
        return open_store(str(tmp_path / "store"))
    server: S3Server = request.getfixturevalue("s3_server")
    bucket: str = request.getfixturevalue("s3_bucket")
    return open_store(f"s3://{bucket}/runs/job", server.storage())


def test_store_satisfies_the_protocol(store: Store) -> None:
    assert isinstance(store, Store)


def test_write_then_read_round_trips(store: Store) -> None:
    store.write_bytes("a/b/c.json", b'{"x": 1}')
    assert store.read_bytes("a/b/c.json") == b'{"x": 1}'
    store.write_bytes("a/b/c.json", b"second")
    assert store.read_bytes("a/b/c.json") == b"second"


def test_reading_a_missing_key_raises_not_found(store: Store) -> None:
    with pytest.raises(ObjectNotFoundError, match="no such object") as caught:
        store.read_bytes("missing.bin")
    assert isinstance(caught.value, FileNotFoundError)
    assert store.url("missing.bin") in str(caught.value)


def test_exists(store: Store) -> None:
    assert not store.exists("x")
    store.write_bytes("x", b"")
    assert store.exists("x")


def test_list_is_recursive_sorted_and_relative_to_the_root(store: Store) -> None:
    for key in ["b/2", "a", "b/1/deep", "c"]:
        store.write_bytes(key, key.encode())
    assert store.list() == [ObjectInfo("a", 1), ObjectInfo("b/1/deep", 8), ObjectInfo("b/2", 3), ObjectInfo("c", 1)]
    assert [i.key for i in store.list("b/")] == ["b/1/deep", "b/2"]
    # Prefixes are string prefixes, as on S3: 'b/1' matches 'b/1/deep' and would match 'b/10'.
    assert [i.key for i in store.list("b/1")] == ["b/1/deep"]
    assert store.list("zzz/") == []


def test_list_etag_changes_when_the_object_changes(store: Store) -> None:
    store.write_bytes("k", b"one")
    before = store.list()[0].etag
    store.write_bytes("k", b"two")
    after = store.list()[0].etag
    assert before and after and before != after


def test_delete_and_missing_delete_is_fine(store: Store) -> None:
    store.write_bytes("k", b"v")
    store.delete("k")
    store.delete("k")
    assert not store.exists("k")


def test_delete_prefix_removes_only_that_folder(store: Store) -> None:
    for key in ["ckpt/step-1/model.pt", "ckpt/step-1/meta.json", "ckpt/step-10/model.pt", "metrics.jsonl"]:
        store.write_bytes(key, b"x")
    store.delete_prefix("ckpt/step-1/")
    assert [i.key for i in store.list()] == ["ckpt/step-10/model.pt", "metrics.jsonl"]
    store.delete_prefix("nothing/")


def test_url_names_the_full_location(store: Store) -> None:
    assert store.url("a/b") == f"{store.uri}/a/b"
    assert store.url("") == store.uri


@pytest.mark.parametrize("key", ["", "/abs", "a/../b", "../up", "a//b", "./a", "a/."])
def test_keys_cannot_escape_the_root(store: Store, key: str) -> None:
    with pytest.raises(StorageError, match="invalid key"):
        store.write_bytes(key, b"x")


def _random_file(path: Path, size: int) -> str:
    data = os.urandom(size)
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def test_large_upload_and_download_round_trip(store: Store, tmp_path: Path) -> None:
    source = tmp_path / "big.bin"
    digest = _random_file(source, BIG)
    store.upload_file("ckpt/big.bin", source)
    assert store.list("ckpt/") == [ObjectInfo("ckpt/big.bin", BIG)]
    target = tmp_path / "out" / "big.bin"
    store.download_file("ckpt/big.bin", target)
    assert hashlib.sha256(target.read_bytes()).hexdigest() == digest
    assert [p.name for p in target.parent.iterdir()] == ["big.bin"]  # no temporaries left behind


def test_s3_upload_of_a_large_file_is_multipart(s3_server: S3Server, s3_bucket: str, tmp_path: Path) -> None:
    store = open_store(f"s3://{s3_bucket}/p", s3_server.storage())
    source = tmp_path / "big.bin"
    _random_file(source, BIG)
    store.upload_file("big.bin", source)
    etag = s3_server.client().head_object(Bucket=s3_bucket, Key="p/big.bin")["ETag"]
    assert etag.strip('"').endswith("-2")  # a multipart ETag carries the part count


def test_failed_download_leaves_nothing_at_the_destination(store: Store, tmp_path: Path) -> None:
    target = tmp_path / "out" / "x.bin"
    with pytest.raises(ObjectNotFoundError):
        store.download_file("missing.bin", target)
    assert not target.exists()
    assert list(target.parent.iterdir()) == []


def test_upload_of_a_missing_local_file_fails(store: Store, tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="no such"):
        store.upload_file("k", tmp_path / "nope.bin")
    assert not store.exists("k")


def test_readers_see_the_old_or_the_new_object_never_a_partial_one(store: Store) -> None:
    old, new = b"o" * 300_000, b"n" * 500_000
    store.write_bytes("state.json", old)
    seen: set[bytes] = set()
    stop = threading.Event()

    def read_continuously() -> None:
        while not stop.is_set():
            seen.add(store.read_bytes("state.json"))

    reader = threading.Thread(target=read_continuously)
    reader.start()
    try:
        for payload in [new, old] * 10:
            store.write_bytes("state.json", payload)
    finally:
        stop.set()
        reader.join()
    assert seen <= {old, new}


def test_local_listing_hides_in_flight_temporaries(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.write_bytes("a", b"x")
    (tmp_path / f".a.1234{TMP_SUFFIX}").write_bytes(b"partial")
    assert [i.key for i in store.list()] == ["a"]


def test_local_write_with_is_atomic(tmp_path: Path) -> None:
    """A checkpoint written in place: the old file stays whole until the new one is complete, and a write
    that fails leaves the old file and no temporary behind."""
    store = LocalStore(tmp_path)
    store.write_with("ckpt/state.pt", lambda path: path.write_bytes(b"old"))

    def fail_halfway(path: Path) -> None:
        path.write_bytes(b"partial")
        assert store.read_bytes("ckpt/state.pt") == b"old"  # not visible while being written
        raise OSError(28, "No space left on device")

    with pytest.raises(StorageError, match="No space left"):
        store.write_with("ckpt/state.pt", fail_halfway)
    assert store.read_bytes("ckpt/state.pt") == b"old"
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == ["state.pt"]
    store.write_with("ckpt/state.pt", lambda path: path.write_bytes(b"new"))
    assert store.read_bytes("ckpt/state.pt") == b"new"


def test_local_delete_prefix_prunes_empty_folders(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "root")
    store.write_bytes("ckpt/step-1/model.pt", b"x")
    store.delete_prefix("ckpt/")
    assert list((tmp_path / "root").iterdir()) == []


def test_s3_listing_skips_folder_markers(s3_server: S3Server, s3_bucket: str) -> None:
    s3_server.client().put_object(Bucket=s3_bucket, Key="p/folder/", Body=b"")
    s3_server.client().put_object(Bucket=s3_bucket, Key="p/folder/file", Body=b"abc")
    store = open_store(f"s3://{s3_bucket}/p/", s3_server.storage())
    assert store.list() == [ObjectInfo("folder/file", 3)]


def test_s3_listing_paginates(s3_server: S3Server, s3_bucket: str) -> None:
    store = open_store(f"s3://{s3_bucket}/p", s3_server.storage())
    assert isinstance(store, S3Store)
    store.page_size = 3
    for i in range(10):
        store.write_bytes(f"{i:02d}", b"")
    assert [i.key for i in store.list()] == [f"{i:02d}" for i in range(10)]
    store.delete_prefix("")
    assert store.list() == []


@pytest.fixture
def in_tmp(tmp_path: Path) -> Iterator[Path]:
    cwd = Path.cwd()
    os.chdir(tmp_path)
    try:
        yield tmp_path
    finally:
        os.chdir(cwd)


def test_open_store_parses_uris(in_tmp: Path, s3_server: S3Server) -> None:
    assert isinstance(open_store("./rel"), LocalStore)
    assert open_store("./rel").uri == str(in_tmp / "rel")
    assert (in_tmp / "rel").is_dir()
    assert open_store(f"file://{in_tmp}/f").uri == str(in_tmp / "f")
    assert open_store(str(in_tmp / "abs")).uri == str(in_tmp / "abs")
    s3 = open_store("s3://bucket/a/b/", s3_server.storage())
    assert isinstance(s3, S3Store)
    assert (s3.uri, s3.url("k")) == ("s3://bucket/a/b", "s3://bucket/a/b/k")
    assert open_store("s3://bucket").url("k") == "s3://bucket/k"


@pytest.mark.parametrize("uri", ["gs://bucket/x", "s3:///nobucket", "s3://b/p?versionId=1"])
def test_open_store_rejects_what_it_cannot_serve(uri: str) -> None:
    with pytest.raises(StorageError, match="s3://bucket/prefix"):
        open_store(uri)


SAFE_SEGMENT = st.text(st.characters(codec="utf-8", exclude_characters="/\0"), min_size=1)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    keys=st.lists(
        st.lists(SAFE_SEGMENT.filter(lambda s: s not in (".", "..") and len(s.encode()) < 200), min_size=1, max_size=3)
        .map("/".join)
        .filter(lambda k: not k.endswith(TMP_SUFFIX)),
        min_size=1,
        max_size=5,
        unique=True,
    )
)
def test_local_store_round_trips_any_safe_key(tmp_path_factory: pytest.TempPathFactory, keys: list[str]) -> None:
    store = LocalStore(tmp_path_factory.mktemp("hyp"))
    written = {}
    for key in keys:
        try:
            store.write_bytes(key, key.encode())
        except StorageError:
            continue  # 'a' then 'a/b': a file cannot also be a folder, as it can on S3
        written[key] = key.encode()
    assert [i.key for i in store.list()] == sorted(written)
    for key, data in written.items():
        assert store.read_bytes(key) == data


def test_importing_kiln_storage_pulls_in_neither_boto3_nor_torch() -> None:
    code = (
        "import sys, kiln.storage, kiln.storage.staging\n"
        "from kiln.storage import stage, stage_once_per_node, cache_dir_for\n"
        "assert stage is kiln.storage.staging.stage\n"
        "assert not {'boto3', 'torch', 'kopf'} & set(sys.modules), sorted(sys.modules)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
