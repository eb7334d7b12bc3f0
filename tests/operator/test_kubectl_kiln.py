"""`kubectl kiln` against the real control plane, through the real kubectl's plugin lookup, on a real run.

One digits TrainingJob (two torchrun pods on the local executor, S3 on moto) is given far more epochs than it is
let run: `kubectl kiln checkpoint` gets a checkpoint acknowledged mid-run, `kubectl kiln logs` shows both
workers, and `kubectl kiln stop` ends it Succeeded with reason Stopped while `kubectl kiln watch` follows it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from operator_process import OperatorProcess
from test_end_to_end import create_secret, diagnostics, get_tj, manifest, s3_exists, upload_digits

from kiln.testing.controlplane import ControlPlane
from kiln.testing.s3 import S3Server

pytestmark = [pytest.mark.controlplane, pytest.mark.slow, pytest.mark.timeout(300)]

NAME = "steered"


@pytest.fixture
def kubectl_kiln(cluster: ControlPlane, tmp_path: Path) -> tuple[list[str], dict[str, str]]:
    """(argv, environment) running `kubectl kiln` as a user would: the kubectl binary finds `kubectl-kiln` on PATH
    (here a shim for the checkout's entry point, which an installed Kiln puts in its bin/)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "kubectl-kiln"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m kiln.kubectl_plugin "$@"\n')
    shim.chmod(0o755)
    kubectl = shutil.which("kubectl") or str(Path(sys.executable).parent / "kubectl")
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "KUBECONFIG": str(cluster.kubeconfig),
           "COLUMNS": "200"}  # fmt: skip
    env.pop("PYTHONPATH", None)  # the checkout's operator/ folder would shadow the standard library's operator
    return [kubectl, "kiln"], env


def run(plugin: tuple[list[str], dict[str, str]], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    argv, env = plugin
    # Not from the checkout's root either: `python -m` puts the working directory first on sys.path.
    return subprocess.run([*argv, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False,
                          cwd="/")  # fmt: skip


def wait_for_step(cluster: ControlPlane, namespace: str, step: int, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = get_tj(cluster, namespace, NAME).get("status") or {}
        if status.get("phase") in ("Succeeded", "Failed"):
            break
        if status.get("phase") == "Running" and int((status.get("progress") or {}).get("step") or 0) >= step:
            return status
        time.sleep(0.3)
    raise AssertionError(f"{NAME} did not reach step {step} while Running: {status}")


def test_kubectl_kiln_checkpoints_logs_watches_and_stops_a_running_job(
    cluster: ControlPlane,
    kiln_operator: OperatorProcess,
    namespace: str,
    s3_server: S3Server,
    s3_bucket: str,
    tmp_path: Path,
    kubectl_kiln: tuple[list[str], dict[str, str]],
) -> None:
    upload_digits(s3_server, s3_bucket, tmp_path)
    create_secret(cluster, namespace, s3_server)
    document = manifest(namespace, s3_bucket, s3_server, name=NAME)
    document["spec"]["epochs"] = 500  # never reached: the stop ends it
    document["spec"]["checkpoint"] = {"uri": f"s3://{s3_bucket}/runs/{NAME}/checkpoints", "everyEpochs": 100,
                                      "keepLast": 5}  # fmt: skip
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(document))
    ns = ["-n", namespace]
    try:
        wait_for_step(cluster, namespace, 3, timeout=150)
    except AssertionError as error:
        raise AssertionError(diagnostics(cluster, namespace, kiln_operator, NAME)) from error

    # Checkpoint now: the token comes back in status.control with the checkpoint it produced.
    saved = run(kubectl_kiln, *ns, "checkpoint", NAME, "--token", "t-1", "--timeout", "60")
    assert saved.returncode == 0, saved.stderr + diagnostics(cluster, namespace, kiln_operator, NAME)
    control = get_tj(cluster, namespace, NAME)["status"]["control"]
    assert control["checkpointAcknowledged"] == "t-1" and s3_exists(s3_server, control["checkpoint"]), control
    assert control["checkpoint"] in saved.stdout

    # Every worker's log, each line tagged with its node rank.
    logs = run(kubectl_kiln, *ns, "logs", NAME)
    assert logs.returncode == 0, logs.stderr
    lines = logs.stdout.splitlines()
    assert any(line.startswith("[node 0] ") and "checkpoint 't-1' requested" in line for line in lines), logs.stdout
    assert any(line.startswith("[node 1] ") for line in lines), logs.stdout[-3000:]
    only_one = run(kubectl_kiln, *ns, "logs", NAME, "--rank", "1")
    assert only_one.returncode == 0 and only_one.stdout, only_one.stderr
    assert all(line.startswith("[node 1] ") for line in only_one.stdout.splitlines())

    # Watch it live, stop it, and see it end Stopped.
    argv, env = kubectl_kiln
    watcher = subprocess.Popen([*argv, *ns, "watch", NAME, "--interval", "0.5"], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, cwd=tmp_path)  # fmt: skip
    try:
        stopped = run(kubectl_kiln, *ns, "stop", NAME)
        assert stopped.returncode == 0, stopped.stderr
        assert get_tj(cluster, namespace, NAME)["metadata"]["annotations"]["kiln.dev/stop"] == "true"
        watched, watch_errors = watcher.communicate(timeout=180)
    finally:
        watcher.kill()
    assert watcher.returncode == 0, watch_errors + diagnostics(cluster, namespace, kiln_operator, NAME)
    assert f"{NAME}: Running (attempt 1)" in watched and f"{NAME} Succeeded (Stopped)" in watched, watched
    assert "epoch" in watched and "step" in watched, watched

    status = get_tj(cluster, namespace, NAME)["status"]
    succeeded = next(c for c in status["conditions"] if c["type"] == "Succeeded")
    assert (status["phase"], succeeded["status"], succeeded["reason"]) == ("Succeeded", "True", "Stopped"), status
    assert succeeded["message"].startswith("stopped on request (kiln.dev/stop)"), succeeded
    assert status["control"]["stopRequested"] is True and status["control"]["stoppedAtStep"] > 0, status
    assert status["progress"]["epoch"] < 500, status["progress"]
    latest = status["checkpoints"]["latest"]
    assert latest.endswith(f"step-{status['control']['stoppedAtStep']:09d}/state.pt") and s3_exists(s3_server, latest)
    kept = status["checkpoints"]["kept"]
    assert kept[-1]["uri"] == latest and control["checkpoint"] in [k["uri"] for k in kept], kept
    assert s3_exists(s3_server, f"s3://{s3_bucket}/runs/{NAME}/output/evaluation.json")  # the best was evaluated

    # -f on finished pods: their whole logs, ending when each container's has (here at once).
    followed = run(kubectl_kiln, *ns, "logs", NAME, "-f", "--attempt", "1")
    assert followed.returncode == 0, followed.stderr
    assert any(line.startswith("[node 0] ") and "training completed" in line for line in followed.stdout.splitlines())
    none = run(kubectl_kiln, *ns, "logs", NAME, "--attempt", "2")
    assert none.returncode == 1 and "no pods for attempt 2" in none.stderr, none

    # Stopping a finished job changes nothing; a missing job is invalid input.
    again = run(kubectl_kiln, *ns, "stop", NAME)
    assert again.returncode == 0 and "Succeeded already" in again.stdout, again
    missing = run(kubectl_kiln, *ns, "stop", "no-such-job")
    assert missing.returncode == 2 and "NAME:" in missing.stderr and "not found" in missing.stderr, missing


def test_kubectl_kiln_suspend_and_resume_set_run_policy(
    cluster: ControlPlane, kiln_crds: None, namespace: str, s3_server: S3Server, s3_bucket: str,
    kubectl_kiln: tuple[list[str], dict[str, str]],
) -> None:  # fmt: skip
    """What the plugin writes, read back from the apiserver."""
    document = manifest(namespace, s3_bucket, s3_server, name="paused")
    document["spec"]["runPolicy"]["suspend"] = True
    document["spec"]["resources"]["nodeSelector"] = {"kiln.dev/no-such-node": "true"}  # an operator starts nothing
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(document))
    ns = ["-n", namespace]

    def suspended() -> bool:
        return bool(get_tj(cluster, namespace, "paused")["spec"]["runPolicy"]["suspend"])

    resumed = run(kubectl_kiln, *ns, "resume", "paused")
    assert resumed.returncode == 0, resumed.stderr
    assert not suspended()
    paused = run(kubectl_kiln, *ns, "suspend", "paused")
    assert paused.returncode == 0, paused.stderr
    assert suspended()
    token = run(kubectl_kiln, *ns, "checkpoint", "paused", "--token", "x" * 254)
    assert token.returncode == 2 and "--token" in token.stderr, token
    asked = run(kubectl_kiln, *ns, "checkpoint", "paused", "--token", "later", "--no-wait")
    assert asked.returncode == 0, asked.stderr
    assert get_tj(cluster, namespace, "paused")["metadata"]["annotations"]["kiln.dev/checkpoint"] == "later"
    missing = run(kubectl_kiln, *ns, "logs", "no-such-job")
    assert missing.returncode == 2 and "not found" in missing.stderr, missing

    # The same commands are kiln's, the cluster options after the name.
    _, env = kubectl_kiln
    through_kiln = subprocess.run([sys.executable, "-m", "kiln.cli", "resume", "paused", *ns], env=env, cwd="/",
                                  capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert through_kiln.returncode == 0 and "paused resumed" in through_kiln.stdout, through_kiln
    assert not suspended()
