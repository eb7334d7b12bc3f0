"""Dataset staging: Kiln's ``stage()`` against a plain parallel boto3 download of the same prefix.

The baseline is the practical limit of a download by hand: list the prefix with a paginator, then
``client.download_file`` for every key from a ``ThreadPoolExecutor`` with the same parallelism, on a client
whose connection pool fits that many threads. Kiln's path is ``kiln.storage.stage(uri, dest, storage,
parallelism=N)``, which also writes its marker, verifies every size and renames each file into place. Two
shapes: many small files (2,000 x 8 KiB) and a few large ones (4 x 64 MiB). Each round stages into a fresh folder;
the two paths alternate, which goes first swaps every round, the first round is discarded, and the figures are
medians.

    .venv/bin/python bench/staging.py --rounds 5

moto's S3 server runs in its own process on 127.0.0.1 (so it does not share this process's GIL) and holds the
objects in memory: about 300 MB.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import boto3
from botocore.config import Config
from moto_process import moto_server

from kiln.api.training import StorageSpec
from kiln.storage import stage

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

TARGET_RATIO = 0.9
BUCKET = "kiln-bench-staging"


@dataclass(frozen=True)
class Shape:
    name: str
    count: int
    size: int

    @property
    def prefix(self) -> str:
        return f"{self.name}/"

    @property
    def total(self) -> int:
        return self.count * self.size


SHAPES = (Shape("small", 2000, 8 * 1024), Shape("large", 4, 64 * 1024 * 1024))


def upload(client: S3Client, shape: Shape) -> None:
    def put(index: int) -> None:
        body = os.urandom(shape.size)  # incompressible, and every object different
        client.put_object(Bucket=BUCKET, Key=f"{shape.prefix}{index // 100:03d}/{index:05d}.bin", Body=body)

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(put, range(shape.count)))


def plain_boto3(client: S3Client, shape: Shape, dest: Path, parallelism: int) -> int:
    """List the prefix, then download_file every key in ``parallelism`` threads; the bytes written."""
    keys: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=shape.prefix):
        keys.extend(obj["Key"] for obj in page.get("Contents", []))

    def fetch(key: str) -> None:
        path = dest / key.removeprefix(shape.prefix)
        path.parent.mkdir(parents=True, exist_ok=True)
        client.download_file(BUCKET, key, str(path))

    with ThreadPoolExecutor(max_workers=parallelism) as pool:
        list(pool.map(fetch, keys))
    return sum(path.stat().st_size for path in dest.rglob("*.bin"))


def kiln_stage(endpoint: str, shape: Shape, dest: Path, parallelism: int) -> int:
    stage(f"s3://{BUCKET}/{shape.name}", dest, StorageSpec(endpoint_url=endpoint), parallelism=parallelism)
    return sum(path.stat().st_size for path in dest.rglob("*.bin"))


def timed(download: Callable[[Path], int], folder: Path, expected: int) -> float:
    """Seconds for one download into a fresh folder, checked to hold every byte; the folder is removed after."""
    dest = folder / "dest"
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir()
    os.sync()  # the previous round's dirty pages are written back before the clock starts, not during
    start = time.perf_counter()
    written = download(dest)
    elapsed = time.perf_counter() - start
    assert written == expected, (written, expected)
    shutil.rmtree(dest)
    return elapsed


def run(endpoint: str, rounds: int, parallelism: int, folder: Path) -> dict[str, dict[str, list[float]]]:
    plain_client = boto3.client("s3", endpoint_url=endpoint, config=Config(max_pool_connections=parallelism))
    plain_client.create_bucket(Bucket=BUCKET)
    seconds: dict[str, dict[str, list[float]]] = {}
    for shape in SHAPES:
        upload(plain_client, shape)
        print(f"{shape.name}: uploaded {shape.count} x {shape.size} bytes", file=sys.stderr, flush=True)
        paths: dict[str, Callable[[Path], int]] = {
            "kiln": lambda dest, shape=shape: kiln_stage(endpoint, shape, dest, parallelism),
            "boto3": lambda dest, shape=shape: plain_boto3(plain_client, shape, dest, parallelism),
        }
        seconds[shape.name] = {name: [] for name in paths}
        for index in range(rounds + 1):  # round 0 warms up connections, moto and the page cache
            order = list(paths.items()) if index % 2 else list(reversed(paths.items()))
            for name, download in order:
                elapsed = timed(download, folder, shape.total)
                print(f"{shape.name} round {index}: {name} {elapsed:.2f} s", file=sys.stderr, flush=True)
                if index > 0:
                    seconds[shape.name][name].append(elapsed)
    return seconds


def report(seconds: dict[str, dict[str, list[float]]], parallelism: int, load: tuple[float, ...], command: str) -> None:
    after = os.getloadavg()
    print(
        f"parallelism {parallelism}; load average (1, 5, 15 min) at the start"
        f" {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}, at the end {after[0]:.1f} {after[1]:.1f} {after[2]:.1f}\n"
    )
    print("| shape | path | median s | min-max s | MB/s (median) |")
    print("|---|---|---|---|---|")
    ratios = {}
    for shape in SHAPES:
        rates = {}
        for name, times in seconds[shape.name].items():
            median = statistics.median(times)
            rates[name] = shape.total / 1e6 / median
            each = f"{shape.size >> 20} MiB" if shape.size >= 1 << 20 else f"{shape.size >> 10} KiB"
            label = f"{shape.count} x {each}"
            print(f"| {label} | {name} | {median:.2f} | {min(times):.2f}-{max(times):.2f} | {rates[name]:.1f} |")
        ratios[shape.name] = rates["kiln"] / rates["boto3"]
    print()
    for name, ratio in ratios.items():
        verdict = "meets" if ratio >= TARGET_RATIO else "MISSES"
        print(f"{name}: Kiln / plain boto3 throughput {ratio:.2f} ({verdict} the target of >= {TARGET_RATIO})")
    print(f"command: {command}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per path and shape (default 5)")
    parser.add_argument("--parallelism", type=int, default=16, help="concurrent downloads (Kiln's default, 16)")
    args = parser.parse_args()
    command = shlex.join([".venv/bin/python", "bench/staging.py", *sys.argv[1:]])
    load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="kiln-bench-staging-") as folder, moto_server() as endpoint:
        seconds = run(endpoint, args.rounds, args.parallelism, Path(folder))
    report(seconds, args.parallelism, load, command)


if __name__ == "__main__":
    main()
