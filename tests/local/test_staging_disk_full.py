"""A staging cache on a disk too small for the dataset: ``kiln run`` ends with one line that names the split, the
dataset and the full filesystem, exit 1 (the trainer's documented code for a failure that is not invalid input),
and nothing is reported completed. The cache is a real 64 KiB tmpfs, so the kernel's ENOSPC is what is met."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from local_testkit import write_manifest

from kiln.api.contract import ExitCode
from kiln.testing.s3 import S3Server
from kiln.testing.small_filesystem import small_filesystem

pytestmark = pytest.mark.slow
StartKilnRun = Callable[[Path], subprocess.Popen[str]]


@pytest.mark.timeout(300)
def test_a_full_staging_cache_fails_the_run_with_one_clear_line(
    tmp_path: Path, tiny_data: Path, s3_server: S3Server, s3_bucket: str, start_kiln_run: StartKilnRun
) -> None:
    for split in ("train", "val"):
        for image in sorted((tiny_data / split).rglob("*.png")):
            key = f"tiny/{image.relative_to(tiny_data).as_posix()}"
            s3_server.client().upload_file(str(image), s3_bucket, key)
    train = f"s3://{s3_bucket}/tiny/train"
    with small_filesystem(tmp_path / "cache", 64 * 1024) as cache:
        data = {
            "train": {"uri": train},
            "val": {"uri": f"s3://{s3_bucket}/tiny/val"},
            "staging": {"cacheDir": str(cache)},
        }
        storage = {"endpointUrl": s3_server.endpoint_url}
        manifest = write_manifest(tmp_path / "job.yaml", "full", None, data=data, storage=storage)
        run = start_kiln_run(manifest)
        output, _ = run.communicate(timeout=240)

    assert run.returncode == ExitCode.FAILED, output
    # The reason is one line; the terminal (COLUMNS=200) wraps it, so compare with the whitespace collapsed.
    last = " ".join(output.rstrip().rpartition("failed (exit 1, error): ")[2].split())
    reason = f"NoSpaceError: data.train.uri: {train}: no space left for the staging cache on {cache}: "
    assert last.startswith(reason), output
    assert " kB still to stage, " in last and " kB free there; give the cache more room" in last, last
    assert "completed" not in output and "Traceback" not in output, output
