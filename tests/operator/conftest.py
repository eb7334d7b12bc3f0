"""Real-control-plane fixtures for the operator: the CRDs, its RBAC, and the operator as a process."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from operator_process import OperatorProcess

from kiln.testing.controlplane import ControlPlane
from kiln.testing.kube import ApiError, namespaced
from kiln.testing.processes import wait_until

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "helm/kiln/files/operator-rbac-rules.yaml"
LEADER_RULES = REPO / "helm/kiln/files/operator-leader-election-rules.yaml"
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
        # The leader-election Lease: a Role in the operator's own namespace, as the chart makes it.
        (namespaced("roles", OPERATOR_NAMESPACE, group_version="rbac.authorization.k8s.io/v1"),
         {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "kiln-operator-leases"},
          "rules": yaml.safe_load(LEADER_RULES.read_text())}),
        (namespaced("rolebindings", OPERATOR_NAMESPACE, group_version="rbac.authorization.k8s.io/v1"),
         {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
          "metadata": {"name": "kiln-operator-leases"},
          "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "kiln-operator-leases"},
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


@pytest.fixture(scope="session")
def kiln_operator(cluster: ControlPlane, operator_kubeconfig: Path) -> Iterator[OperatorProcess]:
    operator = OperatorProcess(operator_kubeconfig, cluster.root / "logs" / "kiln-operator.log").start()
    try:
        yield operator
    finally:
        operator.stop()
