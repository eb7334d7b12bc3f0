"""The real Kueue manager (tools/install-kueue.sh) against a running ``ControlPlane``.

``Kueue(cluster).start()`` installs Kueue's CRDs (server-side apply: some are too large for the last-applied
annotation), writes a configuration that runs outside a cluster, serves the webhook on loopback with a
self-signed certificate, registers the batch/v1 Job webhooks for Jobs that carry a queue name, and waits for
``/readyz``. ``queue(namespace, gpus=...)`` then creates a ClusterQueue and a LocalQueue for one test.
``stop()`` removes the webhook registrations first, so Job creates elsewhere never wait on a stopped webhook.

The out-of-cluster settings and each gotcha are in docs/operations.md ("Kueue set-up", "Running the real Kueue
locally"). Kueue runs as cluster admin here: its RBAC is not what the tests are about.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import json
import os
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kiln.operator.labels import KUEUE_API_VERSION, KUEUE_QUEUE_NAME
from kiln.testing.certs import CertificateAuthority
from kiln.testing.controlplane import ControlPlane
from kiln.testing.kube import JSON, ApiError, namespaced
from kiln.testing.nodes import GPU_RESOURCE
from kiln.testing.processes import ManagedProcess, free_port, wait_until
from kiln.testing.tools import tool_path, tools_cache

KUEUE_NAMESPACE = "kueue-system"
FLAVOR = "kiln-default-flavor"
# Kueue v0.17.0 loads its metrics serving pair from this fixed path whenever internal cert management is off
# (cmd/kueue/main.go, metricsCertPath); no flag or config field moves it, and without it the manager exits.
METRICS_CERT_DIR = Path("/etc/kueue/metrics/certs")
# Kueue's own webhook paths for the batch/job integration (config/components/webhook/manifests.yaml).
JOB_WEBHOOKS = {
    "MutatingWebhookConfiguration": ("mjob.kb.io", "/mutate-batch-v1-job", ["CREATE"]),
    "ValidatingWebhookConfiguration": ("vjob.kb.io", "/validate-batch-v1-job", ["CREATE", "UPDATE"]),
}
WEBHOOK_CONFIG_NAME = "kiln-test-kueue"
KUEUE_GROUP = KUEUE_API_VERSION.split("/")[0]


def crd_dir() -> Path:
    """The CRDs tools/install-kueue.sh copied out of the module download."""
    return tools_cache() / "kueue" / "crds"


def kueue_path(plural: str, name: str = "", namespace: str | None = None) -> str:
    """The REST path of a Kueue object (cluster-scoped unless ``namespace``)."""
    if namespace is not None:
        return namespaced(plural, namespace, name, group_version=KUEUE_API_VERSION)
    return f"/apis/{KUEUE_API_VERSION}/{plural}" + (f"/{name}" if name else "")


class KueueUnavailable(RuntimeError):
    """Kueue cannot start here; the message says what to install or fix."""


class Kueue:
    """One Kueue manager process against ``cluster``; start with ``start()``, stop with ``stop()``."""

    def __init__(self, cluster: ControlPlane, startup_timeout: float = 60.0) -> None:
        self.cluster = cluster
        self.root = cluster.root / "kueue"
        self.startup_timeout = startup_timeout
        self.health_port, self.metrics_port, self.webhook_port = free_port(), free_port(), free_port()
        self.process: ManagedProcess | None = None

    def start(self) -> Kueue:
        binary, crds = tool_path("kueue"), sorted(crd_dir().glob("kueue.x-k8s.io_*.yaml"))
        if not crds:
            raise KueueUnavailable(f"{crd_dir()}: no Kueue CRDs; run `make tools` (tools/install-kueue.sh)")
        self.root.mkdir(parents=True, exist_ok=True)
        self._install_crds(crds)
        self._create(
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": KUEUE_NAMESPACE}}, "/api/v1/namespaces"
        )
        ca = CertificateAuthority(self.root / "pki")
        webhook_dir = self.root / "webhook-certs"
        webhook_dir.mkdir(exist_ok=True)
        serving = ca.issue("serving", common_name="kueue-webhook", server=True)  # SANs include IP 127.0.0.1
        for source, name in ((serving.cert, "tls.crt"), (serving.key, "tls.key")):
            (webhook_dir / name).write_bytes(source.read_bytes())
        _write_metrics_certs(ca)
        config = self.root / "config.yaml"
        config.write_text(json.dumps(self._configuration(webhook_dir)))
        argv = [
            str(binary),
            f"--config={config}",
            f"--kubeconfig={self.cluster.kubeconfig}",
            # On by default; it would then serve the visibility API and exit without /visibility/tls.crt.
            "--feature-gates=VisibilityOnDemand=false",
            "--zap-log-level=2",
        ]
        self.process = ManagedProcess("kueue", argv, self.cluster.logs_dir)
        try:
            wait_until(
                self._ready, timeout=self.startup_timeout, what="kueue /readyz", on_tick=self.process.check_alive
            )
            self._register_webhooks(ca.pair.cert.read_bytes())
            self._create({"apiVersion": KUEUE_API_VERSION, "kind": "ResourceFlavor", "metadata": {"name": FLAVOR}},
                         kueue_path("resourceflavors"))  # fmt: skip
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Unregister the webhooks, then SIGTERM the manager. Safe to call twice."""
        for kind in JOB_WEBHOOKS:
            with contextlib.suppress(ApiError):
                self.cluster.kube.delete(f"{_webhook_api(kind)}/{WEBHOOK_CONFIG_NAME}")
        if self.process is not None:
            self.process.stop(grace_seconds=10.0)
            self.process = None

    def log(self) -> str:
        path = self.cluster.component_log_path("kueue")
        return path.read_text(errors="replace") if path.exists() else ""

    # -- quota objects ---------------------------------------------------------------------------

    def queue(self, namespace: str, *, gpus: int, preemption: str = "Never") -> str:
        """A ClusterQueue named after ``namespace`` with ``gpus`` of nvidia.com/gpu (cpu and memory to spare),
        and the LocalQueue ``namespace`` points at it. ``preemption``: withinClusterQueue (Never,
        LowerPriority, LowerOrNewerEqualPriority). Returns the LocalQueue's name."""
        cluster_queue = {
            "apiVersion": KUEUE_API_VERSION,
            "kind": "ClusterQueue",
            "metadata": {"name": namespace},
            "spec": {
                "namespaceSelector": {},
                "preemption": {"withinClusterQueue": preemption},
                "resourceGroups": [
                    {
                        # Every resource Kiln's pods request must be covered, or Kueue admits nothing.
                        "coveredResources": ["cpu", "memory", GPU_RESOURCE],
                        "flavors": [
                            {
                                "name": FLAVOR,
                                "resources": [
                                    {"name": "cpu", "nominalQuota": "256"},
                                    {"name": "memory", "nominalQuota": "2Ti"},
                                    {"name": GPU_RESOURCE, "nominalQuota": str(gpus)},
                                ],
                            }
                        ],
                    }
                ],
            },
        }
        self._create(cluster_queue, kueue_path("clusterqueues"))
        local_queue = {
            "apiVersion": KUEUE_API_VERSION,
            "kind": "LocalQueue",
            "metadata": {"name": namespace, "namespace": namespace},
            "spec": {"clusterQueue": namespace},
        }
        self._create(local_queue, kueue_path("localqueues", namespace=namespace))
        wait_until(
            functools.partial(self._queue_active, namespace), timeout=30, what=f"ClusterQueue {namespace} Active"
        )
        return namespace

    @contextlib.contextmanager
    def queued(self, namespace: str, *, gpus: int, preemption: str = "Never") -> Iterator[str]:
        """``queue()`` for the length of a block; the ClusterQueue is deleted after (the namespace takes the rest)."""
        name = self.queue(namespace, gpus=gpus, preemption=preemption)
        try:
            yield name
        finally:
            with contextlib.suppress(ApiError):
                self.cluster.kube.delete(kueue_path("clusterqueues", namespace))

    def set_gpu_quota(self, cluster_queue: str, gpus: int) -> None:
        """Change the ClusterQueue's nvidia.com/gpu nominal quota."""
        path = kueue_path("clusterqueues", cluster_queue)
        spec = self.cluster.kube.get(path)["spec"]
        for resource in spec["resourceGroups"][0]["flavors"][0]["resources"]:
            if resource["name"] == GPU_RESOURCE:
                resource["nominalQuota"] = str(gpus)
        self.cluster.kube.patch(path, {"spec": {"resourceGroups": spec["resourceGroups"]}},
                                content_type="application/merge-patch+json")  # fmt: skip

    def workloads(self, namespace: str) -> list[JSON]:
        return list(self.cluster.kube.get(kueue_path("workloads", namespace=namespace))["items"])

    # -- internals -------------------------------------------------------------------------------

    def _configuration(self, webhook_dir: Path) -> dict[str, Any]:
        return {
            "apiVersion": "config.kueue.x-k8s.io/v1beta2",
            "kind": "Configuration",
            "namespace": KUEUE_NAMESPACE,
            "health": {"healthProbeBindAddress": f"127.0.0.1:{self.health_port}"},
            "metrics": {"bindAddress": f"127.0.0.1:{self.metrics_port}"},
            "webhook": {"host": "127.0.0.1", "port": self.webhook_port, "certDir": str(webhook_dir)},
            "leaderElection": {"leaderElect": False},
            # On, its rotator wants an in-cluster Service and Secret and retries injecting a CA into the CRDs'
            # (absent) conversion webhooks; the webhook's pair is written here instead.
            "internalCertManagement": {"enable": False},
            "integrations": {"frameworks": ["batch/job"]},
        }

    def _install_crds(self, crds: list[Path]) -> None:
        # One apply and one wait for all eleven: per-file kubectl calls cost seconds each.
        args = [arg for path in crds for arg in ("-f", str(path))]
        self.cluster.kubectl("apply", "--server-side", "--force-conflicts", *args, timeout=120)
        names = [f"{path.stem.split('_', 1)[1]}.{KUEUE_GROUP}" for path in crds]  # <group>_<plural>.yaml
        wait_until(lambda: all(map(self._established, names)), timeout=60, what="Kueue's CRDs Established")
        wait_until(lambda: self._served("workloads"), timeout=30, what="Kueue's API in discovery")

    def _established(self, crd: str) -> bool:
        path = f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{crd}"
        conditions = self.cluster.kube.get(path).get("status", {}).get("conditions", [])
        return any(c["type"] == "Established" and c["status"] == "True" for c in conditions)

    def _served(self, plural: str) -> bool:
        resources = self.cluster.kube.get(f"/apis/{KUEUE_API_VERSION}")["resources"]
        return any(resource["name"] == plural for resource in resources)

    def _ready(self) -> bool:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/readyz", timeout=2) as response:
            return bool(response.status == 200)

    def _register_webhooks(self, ca_bundle: bytes) -> None:
        for kind, (name, path, operations) in JOB_WEBHOOKS.items():
            webhook = {
                "name": name,
                "admissionReviewVersions": ["v1"],
                "clientConfig": {
                    "url": f"https://127.0.0.1:{self.webhook_port}{path}",
                    "caBundle": base64.b64encode(ca_bundle).decode(),
                },
                "failurePolicy": "Fail",
                "sideEffects": "None",
                # Only Jobs that name a queue: every other test's Jobs never depend on this webhook.
                "objectSelector": {"matchExpressions": [{"key": KUEUE_QUEUE_NAME, "operator": "Exists"}]},
                "rules": [{"apiGroups": ["batch"], "apiVersions": ["v1"], "operations": operations,
                           "resources": ["jobs"]}],
            }  # fmt: skip
            body = {"apiVersion": "admissionregistration.k8s.io/v1", "kind": kind,
                    "metadata": {"name": WEBHOOK_CONFIG_NAME}, "webhooks": [webhook]}  # fmt: skip
            with contextlib.suppress(ApiError):
                self.cluster.kube.delete(f"{_webhook_api(kind)}/{WEBHOOK_CONFIG_NAME}")  # a crashed run's leftover
            self.cluster.kube.create(_webhook_api(kind), body)

    def _queue_active(self, name: str) -> bool:
        conditions = self.cluster.kube.get(kueue_path("clusterqueues", name)).get("status", {}).get("conditions", [])
        return any(c["type"] == "Active" and c["status"] == "True" for c in conditions)

    def _create(self, body: JSON, path: str) -> None:
        try:
            self.cluster.kube.create(path, body)
        except ApiError as error:
            if error.status != 409:
                raise


def _webhook_api(kind: str) -> str:
    plural = "mutatingwebhookconfigurations" if kind.startswith("Mutating") else "validatingwebhookconfigurations"
    return f"/apis/admissionregistration.k8s.io/v1/{plural}"


def _write_metrics_certs(ca: CertificateAuthority) -> None:
    """A throwaway pair at Kueue's fixed metrics path, replaced atomically on each start.

    It is left in place afterwards: another test run's Kueue on this machine may be starting from it, and it
    serves only Kueue's loopback metrics port.
    """
    try:
        METRICS_CERT_DIR.mkdir(parents=True, exist_ok=True)
        pair = ca.issue("metrics", common_name="kueue-metrics", server=True)
        for source, name in ((pair.cert, "tls.crt"), (pair.key, "tls.key")):
            staged = METRICS_CERT_DIR / f".{name}.{os.getpid()}"
            staged.write_bytes(source.read_bytes())
            staged.chmod(0o600)
            staged.replace(METRICS_CERT_DIR / name)
    except PermissionError as error:
        raise KueueUnavailable(
            f"{METRICS_CERT_DIR}: cannot write ({error.strerror}); Kueue v0.17 reads its metrics certificate from "
            "there when internalCertManagement is off, so the Kueue tests need root or that directory writable"
        ) from error
