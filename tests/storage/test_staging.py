"""kiln.storage.staging: parallel, resumable, verified staging of a prefix into a node-local cache."""

from __future__ import annotations

import json
import multiprocessing
import time
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event
from pathlib import Path

import pytest

from kiln.storage import TMP_SUFFIX, EmptySourceError, StorageError, Store, open_store
from kiln.storage.staging import LOCK, MARKER, cache_dir_for, is_staged, stage, stage_once_per_node
from kiln.testing.s3 import S3Server

FILES = {f"class{c}/img{i:03d}.jpg": bytes([c, i]) * (100 + 37 * i) for c in range(3) for i in range(12)}


class Recorder:
    """A progress callback that remembers its calls: the first reports files already present."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def __call__(self, done: int, total: int) -> None:
        self.calls.append((done, total))

    @property
    def downloaded(self) -> int:
        return len(self.calls) - 1


def _fill(store: Store, files: dict[str, bytes]) -> None:
    for key, data in files.items():
        store.write_bytes(key, data)


def _assert_staged(dest: Path, files: dict[str, bytes]) -> None:
    for key, data in files.items():
        assert (dest / key).read_bytes() == data, key
    staged = {p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()}
    assert staged == set(files) | {MARKER, LOCK} or staged == set(files) | {MARKER}


@pytest.fixture(params=["s3", "local"])
def source(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, S3Server | None]:
    """A source prefix holding FILES: (uri, server or None for a local directory in copy mode)."""
    if request.param == "local":
        uri = str(tmp_path / "dataset")
        _fill(open_store(uri), FILES)
        return uri, None
    server: S3Server = request.getfixturevalue("s3_server")
    uri = f"s3://{request.getfixturevalue('s3_bucket')}/datasets/pets/train"
    _fill(open_store(uri, server.storage()), FILES)
    return uri, server


def _stage(source: tuple[str, S3Server | None], dest: Path, recorder: Recorder | None = None) -> Path:
    uri, server = source
    return stage(uri, dest, server.storage() if server else None, parallelism=8, progress=recorder)


def test_stage_downloads_everything_and_marks_it(source: tuple[str, S3Server | None], tmp_path: Path) -> None:
    recorder = Recorder()
    dest = _stage(source, tmp_path / "cache", recorder)
    _assert_staged(dest, FILES)
    assert recorder.calls[0] == (0, len(FILES))
    assert recorder.calls[-1] == (len(FILES), len(FILES))
    assert recorder.downloaded == len(FILES)
    marker = json.loads((dest / MARKER).read_text())
    assert marker["complete"] and marker["count"] == len(FILES)
    assert marker["bytes"] == sum(map(len, FILES.values()))
    assert is_staged(dest, source[0])


def test_stage_downloads_large_objects_in_parts(s3_server: S3Server, s3_bucket: str, tmp_path: Path) -> None:
    files = {"big/weights.bin": bytes(range(256)) * (36 * 1024 + 1), "small.txt": b"s"}  # 9 MiB + 256 B
    uri = f"s3://{s3_bucket}/d"
    _fill(open_store(uri, s3_server.storage()), files)
    _assert_staged(stage(uri, tmp_path / "cache", s3_server.storage()), files)


def test_second_stage_downloads_nothing(source: tuple[str, S3Server | None], tmp_path: Path) -> None:
    dest = _stage(source, tmp_path / "cache")
    before = {p: p.stat().st_mtime_ns for p in dest.rglob("*.jpg")}
    recorder = Recorder()
    _stage(source, dest, recorder)
    assert recorder.calls == [(len(FILES), len(FILES))]
    assert {p: p.stat().st_mtime_ns for p in dest.rglob("*.jpg")} == before


def test_interrupted_stage_resumes_with_only_the_damaged_files(
    source: tuple[str, S3Server | None], tmp_path: Path
) -> None:
    dest = _stage(source, tmp_path / "cache")
    # What a crash mid-staging leaves: no complete marker, a missing file, a short file, a temporary.
    (dest / MARKER).unlink()
    (dest / "class0/img003.jpg").unlink()
    (dest / "class1/img007.jpg").write_bytes(b"trunc")
    (dest / f"class2/.img001.jpg.abcd{TMP_SUFFIX}").write_bytes(b"partial")
    recorder = Recorder()
    _stage(source, dest, recorder)
    assert recorder.downloaded == 2
    assert recorder.calls[0] == (len(FILES) - 2, len(FILES))
    _assert_staged(dest, FILES)


def test_stage_interrupted_by_a_crash_then_resumed(source: tuple[str, S3Server | None], tmp_path: Path) -> None:
    def crash_after_ten(done: int, total: int) -> None:
        if done >= 10:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _stage(source, tmp_path / "cache", crash_after_ten)  # type: ignore[arg-type]
    assert not is_staged(tmp_path / "cache", source[0])
    recorder = Recorder()
    _stage(source, tmp_path / "cache", recorder)
    assert recorder.calls[0][0] >= 10
    assert recorder.downloaded == len(FILES) - recorder.calls[0][0]
    _assert_staged(tmp_path / "cache", FILES)


def test_a_changed_source_is_staged_again(source: tuple[str, S3Server | None], tmp_path: Path) -> None:
    dest = _stage(source, tmp_path / "cache")
    uri, server = source
    store = open_store(uri, server.storage() if server else None)
    # Same size, new content: only the listing digest (ETag / inode+mtime) can tell.
    changed = {**FILES, "class0/img000.jpg": b"X" * len(FILES["class0/img000.jpg"])}
    del changed["class2/img011.jpg"]
    store.write_bytes("class0/img000.jpg", changed["class0/img000.jpg"])
    store.delete("class2/img011.jpg")
    _stage(source, dest)
    _assert_staged(dest, changed)


def test_verification_catches_a_size_mismatch(source: tuple[str, S3Server | None], tmp_path: Path) -> None:
    uri, server = source
    store = open_store(uri, server.storage() if server else None)

    def grow_an_object_after_listing(done: int, total: int) -> None:
        if done == 0:  # the first call comes after the listing, before any download
            store.write_bytes("class1/img000.jpg", b"now bigger than listed" * 100)

    with pytest.raises(StorageError, match=r"does not match the listing: 1 of 36 files differ.*class1/img000.jpg"):
        _stage(source, tmp_path / "cache", grow_an_object_after_listing)  # type: ignore[arg-type]
    assert not is_staged(tmp_path / "cache", uri)


def test_an_empty_prefix_is_an_error(s3_server: S3Server, s3_bucket: str, tmp_path: Path) -> None:
    with pytest.raises(EmptySourceError, match=rf"^s3://{s3_bucket}/nothing: no objects under this prefix$"):
        stage(f"s3://{s3_bucket}/nothing/", tmp_path / "cache", s3_server.storage())


def test_keys_that_would_escape_the_cache_are_refused(s3_server: S3Server, s3_bucket: str, tmp_path: Path) -> None:
    s3_server.client().put_object(Bucket=s3_bucket, Key="data/../../escape.txt", Body=b"x")
    with pytest.raises(StorageError, match="invalid key"):
        stage(f"s3://{s3_bucket}/data", tmp_path / "cache" / "d", s3_server.storage())
    assert not (tmp_path / "escape.txt").exists()


def _stage_as_local_rank_1(uri: str, dest: str, endpoint: str, ready: Event, results: Queue[int]) -> None:
    from kiln.api.training import StorageSpec

    recorder = Recorder()
    ready.set()
    stage_once_per_node(
        uri, Path(dest), StorageSpec(endpoint_url=endpoint), local_rank=1, parallelism=4, progress=recorder
    )
    results.put(recorder.downloaded)


def test_stage_once_per_node_downloads_once_across_processes(
    s3_server: S3Server, s3_bucket: str, tmp_path: Path
) -> None:
    uri = f"s3://{s3_bucket}/train"
    _fill(open_store(uri, s3_server.storage()), FILES)
    dest = tmp_path / "cache"
    context = multiprocessing.get_context("spawn")  # the moto server runs in a thread: do not fork it
    ready, results = context.Event(), context.Queue()
    other = context.Process(
        target=_stage_as_local_rank_1, args=(uri, str(dest), s3_server.endpoint_url, ready, results)
    )
    other.start()

    def hold_the_lock_until_rank_1_waits(done: int, total: int) -> None:
        # Called inside rank 0's lock before any download: let rank 1 arrive and block on the lock.
        if done == 0 and ready.wait(timeout=60):
            time.sleep(0.3)
        recorder(done, total)

    recorder = Recorder()
    stage_once_per_node(
        uri, dest, s3_server.storage(), local_rank=0, parallelism=4, progress=hold_the_lock_until_rank_1_waits
    )
    other.join(timeout=60)
    assert other.exitcode == 0
    assert (recorder.downloaded, results.get(timeout=5)) == (len(FILES), 0)
    _assert_staged(dest, FILES)


def test_stage_once_per_node_with_a_barrier_spares_the_other_ranks(
    s3_server: S3Server, s3_bucket: str, tmp_path: Path
) -> None:
    uri = f"s3://{s3_bucket}/train"
    _fill(open_store(uri, s3_server.storage()), {"a": b"1", "b": b"22"})
    dest = tmp_path / "cache"
    waited: list[int] = []
    stage_once_per_node(uri, dest, s3_server.storage(), local_rank=0, wait=lambda: waited.append(0))
    # Rank 1 trusts the marker: with an unreachable endpoint it would fail if it touched S3.
    unreachable = s3_server.storage().model_copy(update={"endpoint_url": "http://127.0.0.1:9"})
    stage_once_per_node(uri, dest, unreachable, local_rank=1, wait=lambda: waited.append(1))
    assert waited == [0, 1]
    with pytest.raises(StorageError, match="local rank 0 finished without staging"):
        stage_once_per_node(uri, tmp_path / "other", unreachable, local_rank=1, wait=lambda: None)


def test_cache_dir_for_is_stable_readable_and_distinct(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a = cache_dir_for("s3://data/imagenet/train", tmp_path)
    assert a == cache_dir_for("s3://data/imagenet/train/", tmp_path)
    assert a.parent == tmp_path
    assert a.name.startswith("imagenet-train-")
    assert a != cache_dir_for("s3://other/imagenet/train", tmp_path)
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "env"))
    assert cache_dir_for("s3://data/imagenet/train", None).parent == tmp_path / "env"
    monkeypatch.delenv("KILN_CACHE_DIR")
    assert cache_dir_for("/x", None).parent == Path("~/.cache/kiln/data").expanduser()
    assert cache_dir_for("s3://b", tmp_path).name.startswith("b-")
