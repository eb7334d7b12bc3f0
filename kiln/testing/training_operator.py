"""Kubeflow's training-operator v1 (tools/install-training-operator.sh) against a running ``ControlPlane``.

The peer bench/operator_vs_kubeflow.py measures Kiln's operator against. ``TrainingOperator(cluster).start()``
installs the PyTorchJob CRD, serves the operator's validating webhook on loopback and registers it, and waits
for ``/readyz``; ``pytorch_job()`` builds a one-node PyTorchJob. Its pods complete on kwok only on a control plane
started with ``ControlPlaneConfig(kwok_completed_owner_kinds=PEER_POD_OWNER_KINDS)``.

How it runs outside a cluster, each point from the v1.8.1 source:
- The webhook cannot be turned off: every controller waits for cert-controller's rotator to report the
  certificates ready (cmd/training-operator.v1/main.go), and the rotator wants the Secret
  ``kubeflow/training-operator-webhook-cert`` to exist (pkg/cert/cert.go). It is created here already holding
  a CA and a serving pair the rotator accepts as valid (RSA keys in PKCS#1, the CA's own name among its SANs,
  more than the rotator's 90 days of look-ahead left), so the rotator keeps them; the serving pair also names
  127.0.0.1, so the apiserver can call the webhook on loopback.
- The rotator never writes the pair to disk (in a cluster a Secret volume does): it only waits for
  ``/tmp/k8s-webhook-server/serving-certs/tls.crt`` to exist, a fixed path. The webhook server reads the pair
  from ``$TMPDIR/k8s-webhook-server/serving-certs`` (controller-runtime's default), so each run gets its own
  TMPDIR and concurrent runs never serve each other's pairs; the fixed path only has to exist.
- The webhook server binds every interface (no flag narrows it); metrics and health bind loopback.
It runs as cluster admin here: its RBAC is not what the benchmark is about.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import ipaddress
import os
import urllib.request
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kiln.testing.controlplane import ControlPlane
from kiln.testing.kube import JSON, ApiError, namespaced
from kiln.testing.processes import ManagedProcess, free_port, wait_until
from kiln.testing.tools import tool_path, tools_cache

API_VERSION = "kubeflow.org/v1"
PEER_POD_OWNER_KINDS = ("PyTorchJob",)
"""Pass as ``ControlPlaneConfig.kwok_completed_owner_kinds`` so kwok completes the peer's pods."""
CRD_NAME, CRD_FILE = "pytorchjobs.kubeflow.org", "kubeflow.org_pytorchjobs.yaml"
# pkg/cert/cert.go: the operator's namespace (MY_POD_NAMESPACE, else this), Secret, webhook configuration and CA
# names, and the DNS name the rotator checks the serving certificate against.
OPERATOR_NAMESPACE = "kubeflow"
CERT_SECRET = "training-operator-webhook-cert"
WEBHOOK_CONFIG_NAME = "validator.training-operator.kubeflow.org"
CA_NAME = "training-operator-ca"
SERVICE_DNS_NAME = f"training-operator.{OPERATOR_NAMESPACE}.svc"
ROTATOR_CERT_PATH = Path("/tmp/k8s-webhook-server/serving-certs/tls.crt")
# The rotator replaces certificates that expire within 90 days (cert-controller's default look-ahead).
VALIDITY = datetime.timedelta(days=365)
# pkg/webhooks/pytorch/pytorchjob_webhook.go's kubebuilder marker.
WEBHOOK_PATH = "/validate-kubeflow-org-v1-pytorchjob"


def crd_path() -> Path:
    """The PyTorchJob CRD tools/install-training-operator.sh copied out of the module download."""
    return tools_cache() / "training-operator" / "crds" / CRD_FILE


def pytorch_jobs_path(namespace: str, name: str = "") -> str:
    return namespaced("pytorchjobs", namespace, name, group_version=API_VERSION)


def pytorch_job(name: str, namespace: str, *, image: str, resources: JSON) -> JSON:
    """One Master replica and no workers: the one-node job, one pod, that a one-node TrainingJob also makes."""
    container = {"name": "pytorch", "image": image, "command": ["torchrun"], "resources": resources}
    return {
        "apiVersion": API_VERSION,
        "kind": "PyTorchJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "pytorchReplicaSpecs": {
                "Master": {
                    "replicas": 1,
                    "restartPolicy": "OnFailure",
                    "template": {"spec": {"containers": [container]}},
                }
            }
        },
    }


def succeeded(job: JSON) -> bool:
    conditions = (job.get("status") or {}).get("conditions") or []
    return any(c["type"] == "Succeeded" and c["status"] == "True" for c in conditions)


class TrainingOperatorUnavailable(RuntimeError):
    """The training-operator cannot start here; the message says what to install or fix."""


class TrainingOperator:
    """One training-operator process (PyTorchJob only) against ``cluster``; ``start()``, then ``stop()``."""

    def __init__(self, cluster: ControlPlane, startup_timeout: float = 90.0) -> None:
        self.cluster = cluster
        self.root = cluster.root / "training-operator"
        self.startup_timeout = startup_timeout
        self.health_port, self.metrics_port, self.webhook_port = free_port(), free_port(), free_port()
        self.process: ManagedProcess | None = None

    @property
    def pid(self) -> int:
        if self.process is None:
            raise RuntimeError("training-operator is not running")
        return self.process.process.pid

    def start(self) -> TrainingOperator:
        binary, crd = tool_path("training-operator"), crd_path()
        if not crd.exists():
            raise TrainingOperatorUnavailable(f"{crd}: missing; run `make tools` (tools/install-training-operator.sh)")
        self._install_crd(crd)
        self.cluster.kube.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                                        "metadata": {"name": OPERATOR_NAMESPACE}})  # fmt: skip
        ca_pem, secret_data = _webhook_certificates()
        self.cluster.kube.create(namespaced("secrets", OPERATOR_NAMESPACE), {
            "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": CERT_SECRET, "namespace": OPERATOR_NAMESPACE},
            "data": {key: base64.b64encode(value).decode() for key, value in secret_data.items()},
        })  # fmt: skip
        tmpdir = self.root / "tmp"
        _write_pair(tmpdir / "k8s-webhook-server" / "serving-certs", secret_data)
        _write_pair(ROTATOR_CERT_PATH.parent, secret_data)  # only stat()ed; any run's pair will do
        self._register_webhook(ca_pem)
        argv = [
            "env", f"TMPDIR={tmpdir}", f"MY_POD_NAMESPACE={OPERATOR_NAMESPACE}",
            str(binary),
            f"--kubeconfig={self.cluster.kubeconfig}",
            "--enable-scheme=pytorchjob",
            f"--metrics-bind-address=127.0.0.1:{self.metrics_port}",
            f"--health-probe-bind-address=127.0.0.1:{self.health_port}",
            f"--webhook-server-port={self.webhook_port}",
            "--leader-elect=false",
            # main.go defaults to zap's development mode, debug level: a line per reconcile step. Kiln's
            # operator logs at info, so the peer does too.
            "--zap-log-level=info",
        ]  # fmt: skip
        self.process = ManagedProcess("training-operator", argv, self.cluster.logs_dir)
        try:
            wait_until(self._ready, timeout=self.startup_timeout, what="training-operator /readyz",
                       on_tick=self.process.check_alive)  # fmt: skip
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Unregister the webhook, then SIGTERM the operator. Safe to call twice."""
        with contextlib.suppress(ApiError):
            self.cluster.kube.delete(f"{_WEBHOOKS_API}/{WEBHOOK_CONFIG_NAME}")
        if self.process is not None:
            self.process.stop(grace_seconds=10.0)
            self.process = None

    def check_alive(self) -> None:
        """Raise with the tail of its log if the operator exited (a ``wait_until`` tick)."""
        if self.process is None:
            raise RuntimeError("training-operator is not running")
        self.process.check_alive()

    def log(self) -> str:
        path = self.cluster.component_log_path("training-operator")
        return path.read_text(errors="replace") if path.exists() else ""

    def _install_crd(self, crd: Path) -> None:
        # Not ControlPlane.install_crds: `kubectl wait` fails at once on this CRD while its status.conditions are
        # still null (the apply returns before the apiserver has set any), so its status is polled here.
        self.cluster.kubectl("apply", "--server-side", "-f", str(crd), timeout=120)
        wait_until(self._established, timeout=60, what=f"CRD {CRD_NAME} Established")

    def _established(self) -> bool:
        status = self.cluster.kube.get(f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{CRD_NAME}")["status"]
        return any(c["type"] == "Established" and c["status"] == "True" for c in status.get("conditions") or [])

    def _ready(self) -> bool:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/readyz", timeout=2) as response:
            return bool(response.status == 200)

    def _register_webhook(self, ca_pem: bytes) -> None:
        # Upstream's rule (manifests/base/webhook/manifests.yaml), served on loopback instead of via a Service.
        webhook = {
            "name": "validator.pytorchjob.training-operator.kubeflow.org",
            "admissionReviewVersions": ["v1"],
            "clientConfig": {"url": f"https://127.0.0.1:{self.webhook_port}{WEBHOOK_PATH}",
                             "caBundle": base64.b64encode(ca_pem).decode()},
            "failurePolicy": "Fail",
            "sideEffects": "None",
            "rules": [{"apiGroups": ["kubeflow.org"], "apiVersions": ["v1"], "operations": ["CREATE", "UPDATE"],
                       "resources": ["pytorchjobs"]}],
        }  # fmt: skip
        body = {"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingWebhookConfiguration",
                "metadata": {"name": WEBHOOK_CONFIG_NAME}, "webhooks": [webhook]}  # fmt: skip
        with contextlib.suppress(ApiError):
            self.cluster.kube.delete(f"{_WEBHOOKS_API}/{WEBHOOK_CONFIG_NAME}")  # a crashed run's leftover
        self.cluster.kube.create(_WEBHOOKS_API, body)


_WEBHOOKS_API = "/apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations"


def _webhook_certificates() -> tuple[bytes, dict[str, bytes]]:
    """(CA PEM, the Secret's data): what cert-controller's rotator would have made, plus IP 127.0.0.1."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CA_NAME),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, "training-operator")])  # fmt: skip
    ca = (
        _builder(ca_name, ca_name, ca_key, now)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(CA_NAME)]), critical=False)  # rotator checks it
        .sign(ca_key, hashes.SHA256())
    )
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    serving = (
        _builder(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, SERVICE_DNS_NAME)]), ca_name, key, now)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(
            [x509.DNSName(SERVICE_DNS_NAME), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    ca_pem = ca.public_bytes(serialization.Encoding.PEM)
    return ca_pem, {
        "ca.crt": ca_pem,
        "ca.key": _pkcs1(ca_key),  # the rotator parses the CA key as PKCS#1 only
        "tls.crt": serving.public_bytes(serialization.Encoding.PEM),
        "tls.key": _pkcs1(key),
    }


def _builder(subject: x509.Name, issuer: x509.Name, key: rsa.RSAPrivateKey, now: datetime.datetime) -> Any:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + VALIDITY)
    )


def _pkcs1(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    )


def _write_pair(directory: Path, secret_data: dict[str, bytes]) -> None:
    """tls.crt and tls.key into ``directory``, each replaced atomically (another run may be reading them)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("tls.crt", "tls.key"):
        staged = directory / f".{name}.{os.getpid()}"
        staged.write_bytes(secret_data[name])
        staged.chmod(0o600)
        staged.replace(directory / name)
