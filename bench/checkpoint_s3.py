"""Checkpoint save + S3 upload: Kiln's path against raw torch.save + boto3, on a resnet50-sized state.

Kiln's path is what the trainer does: ``torch.save`` to a local temporary file, then
``open_store(uri, storage).upload_file(key, path)``. The baseline is the same ``torch.save`` followed by
a default ``boto3.client("s3").upload_file``. Both run against one S3 server, alternating, after a warm-up.

    .venv/bin/python bench/checkpoint_s3.py --reps 7

Without ``--endpoint`` it starts moto's S3 server in a subprocess on 127.0.0.1 (its own process, so the
server does not compete with the client for the GIL); with it, it uses that server and the usual
AWS_* credentials, for example a MinIO next to the trainer.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import boto3
import torch
import torchvision
from moto_process import moto_server

from kiln.api.training import StorageSpec
from kiln.storage import Store, open_store

TARGET_RATIO = 1.2


@dataclass
class Timing:
    save_s: float
    upload_s: float

    @property
    def total_s(self) -> float:
        return self.save_s + self.upload_s


def resnet50_state() -> dict[str, torch.Tensor]:
    """Random tensors with resnet50's state-dict shapes and dtypes (about 100 MB)."""
    torch.manual_seed(0)
    state = torchvision.models.resnet50(weights=None).state_dict()
    return {k: torch.randn_like(v) if v.is_floating_point() else v.clone() for k, v in state.items()}


def timed_save(state: dict[str, torch.Tensor], folder: Path, upload: Callable[[Path], None]) -> Timing:
    # A fresh temporary file each time, as the trainer writes one per checkpoint.
    with tempfile.NamedTemporaryFile(dir=folder, suffix=".pt", delete=False) as handle:
        path = Path(handle.name)
    try:
        start = time.perf_counter()
        torch.save(state, path)
        saved = time.perf_counter()
        upload(path)
        return Timing(saved - start, time.perf_counter() - saved)
    finally:
        path.unlink(missing_ok=True)


def run(endpoint: str, bucket: str, reps: int, folder: Path) -> dict[str, list[Timing]]:
    raw = boto3.client("s3", endpoint_url=endpoint)
    if bucket not in [b["Name"] for b in raw.list_buckets().get("Buckets", [])]:
        raw.create_bucket(Bucket=bucket)
    store: Store = open_store(f"s3://{bucket}/bench/kiln", StorageSpec(endpoint_url=endpoint))
    state = resnet50_state()
    paths: dict[str, Callable[[Path], None]] = {
        "kiln": lambda path: store.upload_file("last.pt", path),
        "raw": lambda path: raw.upload_file(str(path), bucket, "bench/raw/last.pt"),
    }
    timings: dict[str, list[Timing]] = {name: [] for name in paths}
    for rep in range(reps + 1):  # the first round warms up connections and the page cache
        # Alternate which path goes first, so neither always inherits the other's dirty page cache.
        order = list(paths.items()) if rep % 2 else list(reversed(paths.items()))
        for name, upload in order:
            timing = timed_save(state, folder, upload)
            if rep > 0:
                timings[name].append(timing)
    size = raw.head_object(Bucket=bucket, Key="bench/kiln/last.pt")["ContentLength"]
    assert size == raw.head_object(Bucket=bucket, Key="bench/raw/last.pt")["ContentLength"]
    print(f"checkpoint: {size / 1e6:.1f} MB, {reps} repetitions after one warm-up, endpoint {endpoint}\n")
    return timings


def report(timings: dict[str, list[Timing]], command: str) -> float:
    def median(name: str, field: str) -> float:
        return statistics.median(getattr(t, field) for t in timings[name])

    print("| path | save (median s) | upload (median s) | save + upload (median s) | save + upload (min-max s) |")
    print("|---|---|---|---|---|")
    labels = {"kiln": "Kiln: torch.save + Store.upload_file", "raw": "raw: torch.save + boto3 upload_file"}
    for name, label in labels.items():
        print(
            f"| {label} | {median(name, 'save_s'):.3f} | {median(name, 'upload_s'):.3f}"
            f" | {median(name, 'total_s'):.3f} | {min(t.total_s for t in timings[name]):.3f}"
            f"-{max(t.total_s for t in timings[name]):.3f} |"
        )
    ratio = median("kiln", "total_s") / median("raw", "total_s")
    verdict = "meets" if ratio <= TARGET_RATIO else "MISSES"
    print(f"\nratio Kiln / raw (save + upload): {ratio:.2f} ({verdict} the target of <= {TARGET_RATIO})")
    print(f"command: {command}")
    return ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7, help="timed repetitions per path (default 7)")
    parser.add_argument("--endpoint", help="an existing S3 endpoint; default: start moto's server")
    parser.add_argument("--bucket", default="kiln-bench", help="bucket to write to (created if missing)")
    args = parser.parse_args()
    command = shlex.join([".venv/bin/python", "bench/checkpoint_s3.py", *sys.argv[1:]])
    with tempfile.TemporaryDirectory(prefix="kiln-bench-") as folder:
        if args.endpoint:
            timings = run(args.endpoint, args.bucket, args.reps, Path(folder))
        else:
            with moto_server() as endpoint:
                timings = run(endpoint, args.bucket, args.reps, Path(folder))
    report(timings, command)


if __name__ == "__main__":
    main()
