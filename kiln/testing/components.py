"""Command lines of the control-plane components: which flags, and why."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln.testing import kwok_stages
from kiln.testing.certs import KeyPair
from kiln.testing.nodes import KWOK_NODE_SELECTOR

SERVICE_CLUSTER_IP_RANGE = "10.0.0.0/24"
FAKE_POD_CIDR = "10.244.0.1/16"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"


@dataclass(frozen=True)
class Pki:
    """Files that several components are started with."""

    ca: KeyPair
    serving: KeyPair
    service_account: KeyPair
    controller_manager_kubeconfig: Path
    scheduler_kubeconfig: Path
    generated_certs_dir: Path
    """Where components keep the self-signed certs of their own health/metrics ports."""


def binary_version(binary: Path) -> str:
    output = subprocess.run([str(binary), "--version"], capture_output=True, text=True, check=True).stdout
    return output.split()[-1]  # "Kubernetes v1.33.13"


def etcd_args(bin_dir: Path, data_dir: Path, client_port: int, peer_port: int) -> list[str]:
    client_url, peer_url = f"http://127.0.0.1:{client_port}", f"http://127.0.0.1:{peer_port}"
    return [
        str(bin_dir / "etcd"),
        "--name=kiln",
        f"--data-dir={data_dir}",
        f"--listen-client-urls={client_url}",
        f"--advertise-client-urls={client_url}",
        f"--listen-peer-urls={peer_url}",
        f"--initial-advertise-peer-urls={peer_url}",
        f"--initial-cluster=kiln={peer_url}",
        # Test data is disposable: skipping fsync makes every write (and the start) much faster.
        "--unsafe-no-fsync",
        "--log-level=warn",
    ]


def apiserver_args(bin_dir: Path, pki: Pki, port: int, etcd_port: int) -> list[str]:
    return [
        str(bin_dir / "kube-apiserver"),
        f"--etcd-servers=http://127.0.0.1:{etcd_port}",
        f"--secure-port={port}",
        "--bind-address=127.0.0.1",
        "--advertise-address=127.0.0.1",
        f"--tls-cert-file={pki.serving.cert}",
        f"--tls-private-key-file={pki.serving.key}",
        f"--client-ca-file={pki.ca.cert}",
        f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
        f"--service-account-key-file={pki.service_account.cert}",
        f"--service-account-signing-key-file={pki.service_account.key}",
        f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
        "--authorization-mode=Node,RBAC",
        # PodSecurity, ServiceAccount and friends are on by default; NodeRestriction is not.
        "--enable-admission-plugins=NodeRestriction",
        "--allow-privileged=true",  # so that PodSecurity, not this flag, is what rejects privileged pods
        f"--cert-dir={pki.generated_certs_dir / 'kube-apiserver'}",
        "--endpoint-reconciler-type=none",  # no kube-proxy behind the `kubernetes` Service anyway
        "--profiling=false",
    ]


def controller_manager_args(bin_dir: Path, pki: Pki, port: int) -> list[str]:
    return [
        str(bin_dir / "kube-controller-manager"),
        f"--kubeconfig={pki.controller_manager_kubeconfig}",
        "--controllers=*",  # job, garbagecollector, namespace, serviceaccount(-token), node lifecycle...
        "--use-service-account-credentials=true",
        # Each controller's ServiceAccount and token cost requests; at the default 20 QPS they start
        # one by one over ~5 s. Loopback with one client can take far more.
        "--kube-api-qps=200",
        "--kube-api-burst=400",
        f"--service-account-private-key-file={pki.service_account.key}",
        f"--root-ca-file={pki.ca.cert}",
        f"--cluster-signing-cert-file={pki.ca.cert}",
        f"--cluster-signing-key-file={pki.ca.key}",
        "--leader-elect=false",
        f"--secure-port={port}",
        "--bind-address=127.0.0.1",
        f"--cert-dir={pki.generated_certs_dir / 'kube-controller-manager'}",
        "--profiling=false",
    ]


def scheduler_args(bin_dir: Path, pki: Pki, port: int) -> list[str]:
    return [
        str(bin_dir / "kube-scheduler"),
        f"--kubeconfig={pki.scheduler_kubeconfig}",
        "--leader-elect=false",
        f"--secure-port={port}",
        "--bind-address=127.0.0.1",
        f"--cert-dir={pki.generated_certs_dir / 'kube-scheduler'}",
        "--profiling=false",
    ]


def kwok_args(
    bin_dir: Path, kubeconfig: Path, port: int, root: Path, completed_owner_kinds: tuple[str, ...] = ()
) -> list[str]:
    # An explicit configuration keeps a developer's ~/.kwok/kwok.yaml out of the tests; without Stage documents
    # kwok uses its default node-fast and pod-fast stages, which complete only pods a batch/v1 Job owns.
    config = root / "kwok.yaml"
    documents: list[dict[str, Any]] = [{"apiVersion": "config.kwok.x-k8s.io/v1alpha1", "kind": "KwokConfiguration"}]
    if completed_owner_kinds:
        documents += kwok_stages.pod_stages(completed_owner_kinds)
    config.write_text("\n---\n".join(json.dumps(document) for document in documents))
    return [
        str(bin_dir / "kwok"),
        f"--kubeconfig={kubeconfig}",
        f"--config={config}",
        "--manage-all-nodes=false",
        f"--manage-nodes-with-annotation-selector={KWOK_NODE_SELECTOR}",
        f"--cidr={FAKE_POD_CIDR}",
        "--node-ip=10.244.0.1",
        f"--server-address=127.0.0.1:{port}",
    ]


def executor_args(kubeconfig: Path, node_name: str, root: Path, kubelet_version: str) -> list[str]:
    return [
        sys.executable, "-m", "kiln.testing.executor", f"--kubeconfig={kubeconfig}", f"--node-name={node_name}",
        f"--root={root}", f"--kubelet-version={kubelet_version}",
    ]  # fmt: skip
