"""A staging cache that several jobs share (a node-level PersistentVolumeClaim), and one that fills up.

Two jobs are two processes, each its own local rank 0 (no barrier between them), racing to stage into the same
cache root, as two TrainingJobs' pods on one node would through a shared claim. S3 is moto behind the fault
proxy, used here only to count the GETs that reach the server. The disk-full tests stage into a real, small
tmpfs, so the ENOSPC is the kernel's.
"""

from __future__ import annotations

import multiprocessing
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event
from pathlib import Path

import pytest

from kiln.api.training import StorageSpec
from kiln.storage import NoSpaceError, Store, open_store
from kiln.storage.staging import cache_dir_for, is_staged, stage, stage_once_per_node
from kiln.testing.faulty_proxy import FaultyProxy
from kiln.testing.s3 import S3Server
from kiln.testing.small_filesystem import small_filesystem

FILES = {f"class{c}/img{i:03d}.jpg": bytes([c, i]) * (500 + 37 * i) for c in range(3) for i in range(20)}


def _fill(store: Store, files: dict[str, bytes]) -> None:
    for key, data in files.items():
        store.write_bytes(key, data)


def _object_gets(proxy: FaultyProxy, bucket: str, prefix: str) -> int:
    """GETs of objects under s3://bucket/prefix/ that reached the server (listings are GETs of the bucket)."""
    return sum(1 for method, path, _ in proxy.requests if method == "GET" and path.startswith(f"/{bucket}/{prefix}/"))


def _stage_as_a_job(uri: str, root: str, endpoint: str, start: Event, results: Queue[tuple[str, int]]) -> None:
    """One job's local rank 0: stage ``uri`` into its folder under the shared cache root, count its downloads."""
    downloads: list[int] = []
    dest = cache_dir_for(uri, Path(root))
    start.wait(timeout=60)
    stage_once_per_node(
        uri, dest, StorageSpec(endpoint_url=endpoint), local_rank=0, parallelism=4,
        progress=lambda done, total: downloads.append(done),
    )  # fmt: skip
    results.put((uri, len(downloads) - 1))  # the first call reports the files already there


def _race(uris: list[str], root: Path, endpoint: str) -> list[tuple[str, int]]:
    """Start one process per URI, release them together, and return (uri, files it downloaded) for each."""
    context = multiprocessing.get_context("spawn")  # the moto server runs in a thread: do not fork it
    start, results = context.Event(), context.Queue()
    jobs = [context.Process(target=_stage_as_a_job, args=(uri, str(root), endpoint, start, results)) for uri in uris]
    for job in jobs:
        job.start()
    start.set()
    for job in jobs:
        job.join(timeout=90)
    assert [job.exitcode for job in jobs] == [0] * len(jobs)
    return sorted(results.get(timeout=5) for _ in jobs)


def test_two_jobs_staging_one_uri_into_a_shared_cache_download_it_once(
    s3_server: S3Server, s3_bucket: str, tmp_path: Path
) -> None:
    uri = f"s3://{s3_bucket}/shared/train"
    _fill(open_store(uri, s3_server.storage()), FILES)
    root = tmp_path / "node-cache"
    with FaultyProxy(s3_server.endpoint_url, []) as proxy:
        results = _race([uri, uri], root, proxy.endpoint_url)

    # One job downloaded every file; the other waited on the folder's lock and found the marker complete.
    assert sorted(count for _, count in results) == [0, len(FILES)], results
    assert _object_gets(proxy, s3_bucket, "shared/train") == len(FILES), proxy.requests
    dest = cache_dir_for(uri, root)
    assert is_staged(dest, uri)
    assert {key: (dest / key).read_bytes() for key in FILES} == FILES


def test_jobs_staging_different_uris_into_a_shared_cache_never_collide(
    s3_server: S3Server, s3_bucket: str, tmp_path: Path
) -> None:
    # Same readable tail, different buckets' prefixes: only the hash in the folder name tells them apart.
    first, second = f"s3://{s3_bucket}/a/pets/train", f"s3://{s3_bucket}/b/pets/train"
    other_files = {key: data[::-1] + b"b" for key, data in FILES.items()}
    _fill(open_store(first, s3_server.storage()), FILES)
    _fill(open_store(second, s3_server.storage()), other_files)
    root = tmp_path / "node-cache"
    with FaultyProxy(s3_server.endpoint_url, []) as proxy:
        results = _race([first, second], root, proxy.endpoint_url)

    assert results == [(first, len(FILES)), (second, len(FILES))]
    assert cache_dir_for(first, root) != cache_dir_for(second, root)
    for uri, files in ((first, FILES), (second, other_files)):
        dest = cache_dir_for(uri, root)
        assert is_staged(dest, uri)
        assert {key: (dest / key).read_bytes() for key in files} == files, uri


SMALL_FS = 256 * 1024  # 64 pages of tmpfs


def test_a_cache_too_small_for_the_dataset_fails_before_downloading(
    s3_server: S3Server, s3_bucket: str, tmp_path: Path
) -> None:
    uri = f"s3://{s3_bucket}/big/train"
    _fill(open_store(uri, s3_server.storage()), {f"part{i}.bin": bytes(100_000) for i in range(4)})
    with small_filesystem(tmp_path / "cache", SMALL_FS) as mount:
        dest = cache_dir_for(uri, mount)
        with pytest.raises(NoSpaceError) as caught:
            stage(uri, dest, s3_server.storage(), parallelism=4)
        assert not is_staged(dest, uri)
        assert not list(dest.rglob("part*")), "nothing should have been downloaded"
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(
        f"{uri}: no space left for the staging cache on {mount}: 400.0 kB of 400.0 kB still to stage"
    )
    assert "give the cache more room (data.staging.cacheClaim" in message


def test_a_cache_that_fills_up_while_staging_is_a_clear_error_and_keeps_what_it_staged(
    s3_server: S3Server, s3_bucket: str, tmp_path: Path
) -> None:
    uri = f"s3://{s3_bucket}/fills/train"
    files = {f"img{i:02d}.jpg": bytes([i]) * 20_000 for i in range(8)}  # 160 KB: fits the empty filesystem
    _fill(open_store(uri, s3_server.storage()), files)
    with small_filesystem(tmp_path / "cache", SMALL_FS) as mount:
        dest = cache_dir_for(uri, mount)

        def another_job_fills_the_disk(done: int, total: int) -> None:
            # Past the size check, before the first download: another job sharing the volume takes most of it.
            if done == 0:
                (mount / "other-job.bin").write_bytes(bytes(SMALL_FS - 64 * 1024))

        with pytest.raises(NoSpaceError) as caught:
            stage(uri, dest, s3_server.storage(), parallelism=1, progress=another_job_fills_the_disk)
        assert not is_staged(dest, uri)
        kept = sorted(path.name for path in dest.glob("img*.jpg"))
        assert 0 < len(kept) < len(files), kept  # the staged part is kept for the next attempt
        assert not list(dest.rglob("*.kiln-tmp")), "the partial download must not be left behind"
    message = str(caught.value)
    assert message.startswith(f"{uri}: no space left for the staging cache on {mount}: "), message
    assert "\n" not in message
