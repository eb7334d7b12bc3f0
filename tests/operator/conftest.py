"""Real-control-plane fixtures for the operator: the CRDs, its RBAC, and the operator as a process."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from kiln.testing.controlplane import ControlPlane
from kiln.testing.kube import ApiError, namespaced
from kiln.testing.processes import free_port, wait_until

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "helm/kiln/files/operator-rbac-rules.yaml"
OPERATOR_NAMESPACE = "kiln-system"


@pytest.fixture(scope="session")
def operator_kubeconfig(cluster: ControlPlane, kiln_crds: None) -> Path:
    """A ServiceAccount bound to exactly the shipped rules: the operator can do no more than they allow."""
    kube = cluster.kube
    for path, body in [
        ("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": OPERATOR_NAMESPACE}}),
        (namespaced("serviceaccounts", OPERATOR_NAMESPACE),
         {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "kiln-operator"}}),
        ("/apis/rbac.authorization.k8s.io/v1/clusterroles",
         {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": "kiln-operator"},
          "rules": yaml.safe_load(RULES.read_text())}),
        ("/apis/rbac.authorization.k8s.io/v1/clusterrolebindings",
         {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
          "metadata": {"name": "kiln-operator"},
          "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "kiln-operator"},
          "subjects": [{"kind": "ServiceAccount", "name": "kiln-operator", "namespace": OPERATOR_NAMESPACE}]}),
    ]:  # fmt: skip
        try:
            kube.create(path, body)
        except ApiError as error:
            if error.status != 409:
                raise
    wait_until(lambda: kube.exists(namespaced("serviceaccounts", OPERATOR_NAMESPACE, "kiln-operator")),
               timeout=30, what="operator ServiceAccount")  # fmt: skip
    return cluster.service_account_kubeconfig(OPERATOR_NAMESPACE, "kiln-operator")


class OperatorProcess:
    """`kiln operator` as a child process, restartable (the restart tests kill it mid-flight)."""

    def __init__(self, kubeconfig: Path, log_path: Path, **settings: str) -> None:
        self.kubeconfig, self.log_path = kubeconfig, log_path
        self.metrics_port = free_port()
        self.settings = settings
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> OperatorProcess:
        env = {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "KILN_OPERATOR_METRICS_PORT": str(self.metrics_port),
            "KILN_OPERATOR_PROGRESS_INTERVAL_S": "1",
            "KILN_OPERATOR_IMAGE": "kiln/trainer:test",
            **self.settings,
        }
        log = self.log_path.open("ab")
        self.process = subprocess.Popen([sys.executable, "-m", "kiln.cli", "operator"], env=env, stdout=log,
                                        stderr=subprocess.STDOUT, cwd=REPO)  # fmt: skip
        wait_until(self.ready, timeout=30, what="operator /readyz", on_tick=self.check_alive)
        return self

    def check_alive(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"operator exited {self.process.returncode}:\n{self.log()[-3000:]}")

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/readyz", timeout=1) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as response:
            return str(response.read().decode())

    def stop(self, kill: bool = False) -> None:
        if self.process is None:
            return
        if kill:
            self.process.kill()
        else:
            self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None
        time.sleep(0.2)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@pytest.fixture(scope="session")
def kiln_operator(cluster: ControlPlane, operator_kubeconfig: Path) -> Iterator[OperatorProcess]:
    operator = OperatorProcess(operator_kubeconfig, cluster.root / "logs" / "kiln-operator.log").start()
    try:
        yield operator
    finally:
        operator.stop()
