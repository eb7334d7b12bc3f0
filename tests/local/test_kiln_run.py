"""``kiln run`` end to end under torchrun on tiny data: runPolicy applies, failures read as one reason."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from local_testkit import global_rank0, write_manifest

from kiln.api.contract import ExitCode
from tests.trainer.trainer_testkit import latest_pointer, metrics_records, wait_for

pytestmark = pytest.mark.slow
StartKilnRun = Callable[[Path], subprocess.Popen[str]]


@pytest.mark.timeout(300)
def test_invalid_input_found_by_the_trainer_is_one_reason(tmp_path: Path, tiny_data: Path,
                                                          start_kiln_run: StartKilnRun) -> None:  # fmt: skip
    model = {"architecture": "debug", "numClasses": 5}  # the data has 3 classes
    manifest = write_manifest(tmp_path / "job.yaml", "classes", tiny_data, model=model, resources={"procsPerNode": 2})
    run = start_kiln_run(manifest)
    output, _ = run.communicate(timeout=240)
    assert run.returncode == ExitCode.INVALID, output
    assert (
        output.rstrip()
        .splitlines()[-1]
        .startswith("failed (exit 2, invalid input): model.numClasses is 5 but data.train has 3 classes")
    ), output
    assert "Traceback" not in output and "ChildFailedError" not in output, output


@pytest.mark.timeout(400)
def test_a_killed_trainer_is_restarted_and_resumes(tmp_path: Path, tiny_data: Path,
                                                   start_kiln_run: StartKilnRun) -> None:  # fmt: skip
    epochs = 40
    manifest = write_manifest(tmp_path / "job.yaml", "restart", tiny_data, epochs=epochs,
                              runPolicy={"maxRestarts": 2})  # fmt: skip
    run_dir = tmp_path / ".kiln" / "local" / "restart"
    run = start_kiln_run(manifest)
    wait_for(lambda: (latest_pointer(run_dir / "checkpoints") or {}).get("epoch", 0) >= 1, 240, "a checkpoint")
    rank0 = global_rank0(run.pid)
    assert rank0 is not None
    os.kill(rank0, signal.SIGKILL)  # a lost node: nothing gets to save or report
    output, _ = run.communicate(timeout=300)
    assert run.returncode == ExitCode.OK, output
    assert "restart 1/2: the trainer was killed by SIGKILL" in output, output
    assert "resumed at epoch" in output, output
    assert "completed latest checkpoint" in output, output
    epochs_logged = [record["epoch"] for record in metrics_records(run_dir)]
    assert epochs_logged == sorted(set(epochs_logged)) and epochs_logged[-1] == epochs


@pytest.mark.timeout(300)
def test_deadline_stops_with_a_checkpoint(tmp_path: Path, tiny_data: Path, start_kiln_run: StartKilnRun) -> None:
    manifest = write_manifest(tmp_path / "job.yaml", "deadline", tiny_data, epochs=10000,
                              runPolicy={"activeDeadlineSeconds": 40, "terminationGracePeriodSeconds": 60})  # fmt: skip
    run = start_kiln_run(manifest)
    output, _ = run.communicate(timeout=240)
    assert run.returncode == ExitCode.DEADLINE, output
    assert output.rstrip().splitlines()[-1] == "deadline exceeded: runPolicy.activeDeadlineSeconds (40s)", output
    assert "preempted latest checkpoint" in output, output
    assert latest_pointer(tmp_path / ".kiln" / "local" / "deadline" / "checkpoints") is not None
    assert "not applied locally" not in output, output  # a plain manifest: everything in it applies


@pytest.mark.timeout(300)
def test_two_nodes_train_with_world_size_two(tmp_path: Path, tiny_data: Path, start_kiln_run: StartKilnRun) -> None:
    manifest = write_manifest(tmp_path / "job.yaml", "nodes", tiny_data,
                              resources={"nodes": 2, "procsPerNode": 1, "nodeSelector": {"pool": "cpu"}},
                              runPolicy={"queueName": "team-a"})  # fmt: skip
    run = start_kiln_run(manifest)
    output, _ = run.communicate(timeout=240)
    assert run.returncode == ExitCode.OK, output
    lines = output.splitlines()
    assert lines[0].startswith("kiln run local/nodes: 2 node(s) x 1 process(es) = world size 2"), output
    assert lines[1].startswith("not applied locally: resources.nodeSelector ("), output
    assert "runPolicy.queueName (" in lines[1], output
    summary = json.loads((tmp_path / ".kiln" / "local" / "nodes" / "summary.json").read_text())
    assert summary["progress"]["step"] == 2 * 3  # 48 images / world size 2 / batch 8 = 3 steps per epoch
