"""The live pieces the observability tests scrape: a ``kiln run`` trainer, the operator driving a TrainingJob on the
real control plane, and a real Prometheus (the Debian binary, on loopback, its own config and storage)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from kiln.testing.controlplane import ControlPlane
from kiln.testing.kube import MERGE, namespaced
from kiln.testing.processes import free_port, wait_until
from kiln.testing.tools import tool_path

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "helm/kiln/files/prometheus-rules.yaml"
JOB_NAME = "observed"
JOB_NAMESPACE = "local"  # what kiln run resolves a manifest without a namespace to
TJ_API = "/apis/kiln.dev/v1alpha1/namespaces/{ns}/trainingjobs"
NOWHERE = {"kiln.dev/nowhere": "true"}  # no node has it: pods stay Pending until the test writes their status


# -- kiln run -------------------------------------------------------------------------------------------------
def segmentation_manifest(path: Path, data: Path) -> Path:
    """Two "nodes" of one process each (so two ranks on two ports, node ranks 0 and 1), a tiny U-Net whose default
    loss has two terms (dice, cross_entropy), validation and a checkpoint every epoch, and epochs enough to
    still be training whenever the test looks."""
    folder = {"format": "segmentation-folder"}
    spec = {
        "task": "segmentation",
        "model": {"architecture": "unet", "encoder": "tu-tf_mobilenetv3_small_minimal_100", "numClasses": 4},
        "data": {"train": {**folder, "uri": str(data / "train")}, "val": {**folder, "uri": str(data / "val")},
                 "imageSize": 32, "batchSize": 4, "workers": 0},
        "optimizer": {"name": "adamw", "lr": 0.01},
        "epochs": 1000,
        "resources": {"nodes": 2, "procsPerNode": 1, "gpusPerNode": 0},
    }  # fmt: skip
    manifest = {"apiVersion": "kiln.dev/v1alpha1", "kind": "TrainingJob", "metadata": {"name": JOB_NAME}, "spec": spec}
    path.write_text(json.dumps(manifest))
    return path


def start_kiln_run(manifest: Path, cwd: Path) -> subprocess.Popen[bytes]:
    log = (cwd / "kiln-run.log").open("wb")  # a file, not a pipe: nobody drains a pipe while the test runs
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    return subprocess.Popen([sys.executable, "-m", "kiln.cli", "run", str(manifest)], cwd=cwd, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip


def targets_file(cwd: Path) -> Path:
    return cwd / ".kiln" / "runs" / f"{JOB_NAMESPACE}-{JOB_NAME}" / "prometheus-targets.json"


def rank_targets(cwd: Path) -> list[str]:
    """host:port of every rank, in rank order, from the file_sd file kiln run writes."""
    return [target for group in json.loads(targets_file(cwd).read_text()) for target in group["targets"]]


def http_get(url: str, timeout: float = 5) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


# -- the operator's TrainingJob ----------------------------------------------------------------------------------
def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def create_queued_job(cluster: ControlPlane, ns: str, name: str) -> None:
    """A job for Kueue's queue (its Job starts suspended) whose pods no node takes: the test plays the kubelet."""
    spec = {
        "task": "classification",
        "model": {"architecture": "resnet18"},
        "data": {"train": {"uri": "s3://data/train"}, "val": {"uri": "s3://data/val"}},
        "epochs": 3,
        "resources": {"nodes": 1, "gpusPerNode": 1, "nodeSelector": NOWHERE},
        "runPolicy": {"queueName": "team-a", "maxRestarts": 2},
    }
    document = {"apiVersion": "kiln.dev/v1alpha1", "kind": "TrainingJob",
                "metadata": {"name": name, "namespace": ns}, "spec": spec}  # fmt: skip
    cluster.kube.create(TJ_API.format(ns=ns), document)


def trainingjob(cluster: ControlPlane, ns: str, name: str) -> dict[str, Any]:
    return cluster.kube.get(f"{TJ_API.format(ns=ns)}/{name}")


def wait_status(cluster: ControlPlane, ns: str, name: str, key: str, value: Any) -> None:
    wait_until(lambda: (trainingjob(cluster, ns, name).get("status") or {}).get(key) == value, timeout=40,
               what=f"TrainingJob {name} status.{key} == {value}")  # fmt: skip


def attempt_pod(cluster: ControlPlane, ns: str, attempt: int) -> dict[str, Any]:
    def listed() -> list[dict[str, Any]]:
        return cluster.kube.get(namespaced("pods", ns), labelSelector=f"kiln.dev/attempt={attempt}")["items"]

    wait_until(lambda: len(listed()) == 1, timeout=30, what=f"the pod of attempt {attempt}")
    return listed()[0]


def set_pod_status(cluster: ControlPlane, pod: dict[str, Any], *, exit_code: int | None) -> None:
    """Running and Ready (exit_code None), or terminated with exit_code: what a kubelet would report."""
    if exit_code is None:
        phase, ready, state = "Running", "True", {"running": {"startedAt": now()}}
    else:
        phase, ready = "Failed", "False"
        state = {"terminated": {"exitCode": exit_code, "reason": "Error", "startedAt": now(), "finishedAt": now()}}
    status = {"phase": phase, "podIP": "127.0.0.1", "podIPs": [{"ip": "127.0.0.1"}],
              "conditions": [{"type": "Ready", "status": ready, "lastTransitionTime": now()}],
              "containerStatuses": [{"name": "trainer", "ready": ready == "True", "restartCount": 0,
                                     "image": "kiln/trainer:test", "imageID": "", "state": state}]}  # fmt: skip
    path = namespaced("pods", pod["metadata"]["namespace"], pod["metadata"]["name"]) + "/status"
    cluster.kube.patch(path, {"status": status}, content_type=MERGE)


def admit(cluster: ControlPlane, ns: str, job: str) -> None:
    """What Kueue does on admission: unsuspend the Job."""
    path = namespaced("jobs", ns, job, group_version="batch/v1")
    cluster.kube.patch(path, {"spec": {"suspend": False}}, content_type=MERGE)


# -- Prometheus ----------------------------------------------------------------------------------------------------
class Prometheus:
    """``prometheus`` on 127.0.0.1, scraping every second, with the shipped alert rules loaded."""

    def __init__(self, root: Path, trainer_targets: Path, operator_target: str) -> None:
        self.root, self.port = root, free_port()
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [
                {"job_name": "kiln-trainer",
                 "file_sd_configs": [{"files": [str(trainer_targets)], "refresh_interval": "1s"}]},
                {"job_name": "kiln-operator", "static_configs": [{"targets": [operator_target]}]},
            ],
        }  # fmt: skip
        root.mkdir(parents=True, exist_ok=True)
        (root / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Prometheus:
        log = (self.root / "prometheus.log").open("wb")
        self.process = subprocess.Popen(
            [str(tool_path("prometheus")), f"--config.file={self.root / 'prometheus.yml'}",
             f"--storage.tsdb.path={self.root / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        wait_until(self._ready, timeout=30, what="prometheus /-/ready", on_tick=self._check_alive)
        return self

    def _check_alive(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"prometheus exited:\n{(self.root / 'prometheus.log').read_text()[-3000:]}")

    def _ready(self) -> bool:
        try:
            return http_get(f"http://127.0.0.1:{self.port}/-/ready", timeout=1)[0] == 200
        except OSError:
            return False

    def api(self, path: str, **params: Any) -> Any:
        query = urllib.parse.urlencode(params, doseq=True)
        status, body = http_get(f"http://127.0.0.1:{self.port}/api/v1/{path}?{query}", timeout=10)
        payload = json.loads(body)
        if status != 200 or payload.get("status") != "success":
            raise AssertionError(f"{path} {params}: HTTP {status}: {payload.get('error', body[:300])}")
        return payload["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        data = self.api("query", query=expr, time=at if at is not None else time.time())
        assert data["resultType"] == "vector", (expr, data["resultType"])
        return list(data["result"])

    def has(self, expr: str) -> bool:
        return any(math.isfinite(float(sample["value"][1])) for sample in self.query(expr))

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
