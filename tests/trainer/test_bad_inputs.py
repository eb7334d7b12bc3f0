"""Bad inputs end in a clear one-line reason, a termination message and a non-zero exit, never a hang."""

from __future__ import annotations

import json
import shutil
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from trainer_testkit import make_job, run_trainer, trainer_env, write_images, write_spec

from kiln.api.contract import ExitCode
from kiln.testing.s3 import S3Server
from kiln.trainer.train import main


@pytest.fixture
def data(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    write_images(root / "train", 4, size=8)
    write_images(root / "val", 2, size=8)
    return root


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """main() installs signal handlers and reads the environment; keep both from leaking."""
    for key, value in trainer_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    yield
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


def run_in_process(tmp_path: Path, dataset: Path, /, **overrides: Any) -> tuple[int, dict[str, Any]]:
    spec = write_spec(make_job(tmp_path, dataset, epochs=1, **overrides), tmp_path / "spec.json")
    code = main(["--spec", str(spec)])
    return code, json.loads((tmp_path / "termination-log").read_text())


CASES: dict[str, tuple[dict[str, Any], int, str]] = {
    "missing data uri": ({"data": {"train": {"uri": "/nonexistent/train"}}}, ExitCode.INVALID, "does not exist"),
    "class count": ({"model": {"numClasses": 5}}, ExitCode.INVALID, "model.numClasses is 5 but data.train has 3"),
    "unknown timm name": ({"model": {"architecture": "resnet_nope"}}, ExitCode.INVALID, "unknown model.architecture"),
    "unknown transform": (
        {"augmentation": {"transforms": [{"name": "Flipz"}]}},
        ExitCode.INVALID,
        "unknown albumentations transform 'Flipz'",
    ),
    "unknown optimizer": ({"optimizer": {"name": "adamz"}}, ExitCode.INVALID, "unknown optimizer 'adamz'"),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", CASES)
def test_invalid_input(case: str, tmp_path: Path, data: Path) -> None:
    overrides, expected_code, reason = CASES[case]
    code, message = run_in_process(tmp_path, data, **overrides)
    assert code == expected_code
    assert message["state"] == "failed" and reason in message["reason"] and message["exitCode"] == expected_code


@pytest.mark.timeout(60)
def test_empty_class_folder(tmp_path: Path, data: Path) -> None:
    (data / "train" / "empty").mkdir()
    code, message = run_in_process(tmp_path, data)
    assert code == ExitCode.INVALID and "has no images" in message["reason"]


@pytest.mark.timeout(60)
def test_corrupt_image(tmp_path: Path, data: Path) -> None:
    (data / "train" / "class1" / "000.png").write_bytes(b"definitely not a png")
    code, message = run_in_process(tmp_path, data)
    assert (
        code == ExitCode.INVALID
        and "corrupt or unreadable image" in message["reason"]
        and "000.png" in message["reason"]
    )


@pytest.mark.timeout(60)
def test_spec_that_is_not_a_resolved_job(tmp_path: Path) -> None:
    spec = tmp_path / "spec.json"
    spec.write_text('{"name": "x"}')
    assert main(["--spec", str(spec)]) == ExitCode.INVALID


@pytest.mark.timeout(90)
def test_unreachable_s3_endpoint(tmp_path: Path, data: Path) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    code, message = run_in_process(
        tmp_path,
        data,
        data={"train": {"uri": "s3://nowhere/train"}},
        storage={"endpointUrl": f"http://127.0.0.1:{port}"},
    )
    assert code == ExitCode.FAILED  # an outage is worth retrying, unlike a bad spec
    assert "s3://nowhere/train" in message["reason"]


@pytest.mark.timeout(60)
def test_empty_s3_prefix_is_invalid_input(tmp_path: Path, data: Path, s3_server: S3Server, s3_bucket: str) -> None:
    """A URI with nothing under it is a wrong spec (exit 2), not an outage worth retrying (exit 1)."""
    code, message = run_in_process(
        tmp_path,
        data,
        data={"train": {"uri": f"s3://{s3_bucket}/nothing/train"}},
        storage={"endpointUrl": s3_server.endpoint_url},
    )
    assert code == ExitCode.INVALID and message["exitCode"] == ExitCode.INVALID
    assert f"data.train.uri: s3://{s3_bucket}/nothing/train holds no objects" in message["reason"]


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_corrupt_image_under_torchrun_exits_without_hanging(tmp_path: Path, data: Path) -> None:
    shutil.copy(data / "train" / "class0" / "000.png", data / "train" / "class0" / "zzz.png")
    (data / "train" / "class2" / "001.png").write_bytes(b"\x89PNG truncated")
    job = make_job(tmp_path, data, epochs=1, data={"batchSize": 2}, resources={"procsPerNode": 2})
    result = run_trainer(write_spec(job, tmp_path / "spec.json"), trainer_env(tmp_path), procs=2, timeout=100)
    assert result.returncode != 0
    message = json.loads((tmp_path / "termination-log").read_text())
    assert message["state"] == "failed" and "001.png" in message["reason"]
