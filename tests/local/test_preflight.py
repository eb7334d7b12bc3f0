"""``kiln run``'s checks before launch: bad input fails in one line, without starting torchrun."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from local_testkit import cli_env, kiln_run_command, write_manifest

from kiln.api.parse import load_training_job
from kiln.api.resolve import Environment, ResolvedTrainingJob, resolve
from kiln.local_attempt import LocalRun
from kiln.preflight import NO_CUDA, NOT_APPLIED, not_applied_locally, preflight


def resolved(manifest: Path) -> ResolvedTrainingJob:
    job = load_training_job(manifest)
    return resolve(job, Environment(storage_root=str(manifest.parent / ".kiln")), mode="local")


@pytest.fixture
def data(tmp_path: Path) -> Path:
    for split in ("train", "val"):
        (tmp_path / "data" / split / "class0").mkdir(parents=True)
    return tmp_path / "data"


@pytest.fixture
def closed_port() -> int:
    """A port nothing listens on: connections are refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def listening_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


@pytest.mark.timeout(60)
def test_missing_local_data_fails_in_one_line_without_torchrun(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path / "job.yaml", "missing", None, data={"train": {"uri": "./no/such/train"}})
    started = time.monotonic()
    result = subprocess.run(kiln_run_command(manifest), cwd=tmp_path, env=cli_env(), capture_output=True, text=True,
                            timeout=60, check=False)  # fmt: skip
    seconds = time.monotonic() - started
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 2, output
    reason = f"./no/such/train does not exist (in {tmp_path})"
    assert output.splitlines() == [f"error {manifest}: spec.data.train.uri: {reason}"]
    assert "Traceback" not in output
    # Nothing was written for a trainer to read, so no torchrun started (it would take ~14 s and 40 lines).
    assert not (tmp_path / ".kiln").exists()
    assert seconds < 30, f"{seconds:.1f}s: the CLI's imports only, on a loaded machine"


def test_preflight_itself_is_fast_and_names_every_missing_input(tmp_path: Path) -> None:
    manifest = write_manifest(
        tmp_path / "job.yaml", "missing", None,
        data={"train": {"uri": "/no/train"}, "val": {"uri": "file:///no/val"}, "test": {"uri": "rel/test"}},
        model={"architecture": "debug", "pretrained": "/no/weights.pt"}, checkpoint={"resume": "./no/ckpt"},
    )  # fmt: skip
    job = resolved(manifest)
    started = time.monotonic()
    errors = preflight(job, "job.yaml", tmp_path)
    assert time.monotonic() - started < 1.0
    assert [str(error) for error in errors] == [
        "job.yaml: spec.data.train.uri: /no/train does not exist",
        "job.yaml: spec.data.val.uri: file:///no/val does not exist",
        f"job.yaml: spec.data.test.uri: rel/test does not exist (in {tmp_path})",
        "job.yaml: spec.model.pretrained: /no/weights.pt does not exist",
        f"job.yaml: spec.checkpoint.resume: ./no/ckpt does not exist (in {tmp_path})",
    ]


def test_existing_local_inputs_pass(tmp_path: Path, data: Path) -> None:
    manifest = write_manifest(tmp_path / "job.yaml", "ok", data, checkpoint={"resume": "never"})
    assert preflight(resolved(manifest), "job.yaml", tmp_path) == []


def test_unreachable_s3_endpoint_is_named(tmp_path: Path, data: Path, closed_port: int) -> None:
    manifest = write_manifest(tmp_path / "job.yaml", "s3", data, output={"uri": "s3://bucket/runs"},
                              storage={"endpointUrl": f"http://127.0.0.1:{closed_port}"})  # fmt: skip
    started = time.monotonic()
    errors = preflight(resolved(manifest), "job.yaml", tmp_path)
    assert time.monotonic() - started < 1.0
    assert [error.field for error in errors] == ["spec.storage.endpointUrl"]
    assert f"cannot connect to 127.0.0.1:{closed_port}" in errors[0].reason


def test_endpoint_from_the_environment(tmp_path: Path, data: Path, closed_port: int,
                                       monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed_port}")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    manifest = write_manifest(tmp_path / "job.yaml", "s3", data, data={"val": {"uri": "s3://bucket/val"}})
    errors = preflight(resolved(manifest), "job.yaml", tmp_path)
    assert [error.field for error in errors] == ["spec.storage.endpointUrl"]
    assert "from $AWS_ENDPOINT_URL" in errors[0].reason


def test_reachable_endpoint_and_plain_aws_pass(tmp_path: Path, data: Path, listening_port: int,
                                               monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    reachable = write_manifest(tmp_path / "a.yaml", "s3", data, output={"uri": "s3://bucket/runs"},
                               storage={"endpointUrl": f"http://127.0.0.1:{listening_port}"})  # fmt: skip
    assert preflight(resolved(reachable), "a.yaml", tmp_path) == []
    aws = write_manifest(tmp_path / "b.yaml", "s3", data, output={"uri": "s3://bucket/runs"})
    assert preflight(resolved(aws), "b.yaml", tmp_path) == []  # no endpoint to try: AWS itself


def test_fields_without_local_effect_are_listed(tmp_path: Path, data: Path) -> None:
    manifest = write_manifest(
        tmp_path / "job.yaml", "cluster", data, image="example.com/trainer:1",
        resources={"procsPerNode": 1, "nodeSelector": {"pool": "a100"}, "cpu": "4", "gpusPerNode": 1},
        runPolicy={"queueName": "team-a", "maxRestarts": 1, "activeDeadlineSeconds": 60},
        storage={"secretRef": "s3-creds", "region": "eu-west-1"},
    )  # fmt: skip
    spec = load_training_job(manifest).spec
    listed = not_applied_locally(spec, gpus=lambda: 0)
    assert [path for path, _ in listed] == [
        "resources.gpusPerNode", "resources.cpu", "resources.nodeSelector", "image", "storage.secretRef",
        "runPolicy.queueName",
    ]  # fmt: skip
    assert dict(listed)["resources.gpusPerNode"] == NO_CUDA
    assert dict(listed)["runPolicy.queueName"] == NOT_APPLIED["runPolicy.queueName"]
    # With a GPU, gpusPerNode applies; the rest does not depend on the machine.
    assert "resources.gpusPerNode" not in dict(not_applied_locally(spec, gpus=lambda: 1))


def test_plain_manifest_lists_nothing(tmp_path: Path, data: Path) -> None:
    manifest = write_manifest(tmp_path / "job.yaml", "plain", data, resources={"procsPerNode": 1, "gpusPerNode": 0})

    def no_probe() -> int:
        raise AssertionError("gpusPerNode 0 applies anywhere (it hides CUDA); nothing to probe")

    assert not_applied_locally(load_training_job(manifest).spec, gpus=no_probe) == []


def test_trainer_processes_get_the_malloc_tuning_unless_the_user_set_their_own(
    tmp_path: Path, data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = write_manifest(tmp_path / "job.yaml", "ok", data, checkpoint={"resume": "never"})
    run = LocalRun(resolved(manifest), tmp_path / "spec.json", tmp_path)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "12345")
    env = run.environment(0, 1, [0])
    assert env["MALLOC_MMAP_THRESHOLD_"] == "33554432"  # docs/benchmarks.md, segmentation overhead
    assert env["MALLOC_TRIM_THRESHOLD_"] == "12345"
