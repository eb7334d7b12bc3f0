"""A minted ServiceAccount kubeconfig authenticates as that account, and RBAC applies to it."""

from __future__ import annotations

import json

import pytest

from kiln.testing.controlplane import ControlPlane
from kiln.testing.kube import ApiError, KubeClient, namespaced
from kiln.testing.processes import wait_until

pytestmark = pytest.mark.controlplane


def test_service_account_is_forbidden_until_bound(cluster: ControlPlane, namespace: str) -> None:
    cluster.kube.create(
        namespaced("serviceaccounts", namespace),
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "reader"}},
    )
    kubeconfig = cluster.service_account_kubeconfig(namespace, "reader")
    reader = KubeClient(kubeconfig)
    try:
        whoami = json.loads(cluster.kubectl("auth", "whoami", "-o", "json", kubeconfig=kubeconfig).stdout)
        assert whoami["status"]["userInfo"]["username"] == f"system:serviceaccount:{namespace}:reader"
        with pytest.raises(ApiError) as forbidden:
            reader.get(namespaced("pods", namespace))
        assert forbidden.value.status == 403

        rbac = "rbac.authorization.k8s.io/v1"
        cluster.kube.create(
            namespaced("roles", namespace, group_version=rbac),
            {
                "apiVersion": rbac,
                "kind": "Role",
                "metadata": {"name": "pod-reader"},
                "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}],
            },
        )
        cluster.kube.create(
            namespaced("rolebindings", namespace, group_version=rbac),
            {
                "apiVersion": rbac,
                "kind": "RoleBinding",
                "metadata": {"name": "reader-reads-pods"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pod-reader"},
                "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": namespace}],
            },
        )

        # The RBAC authorizer's cache catches up within moments.
        wait_until(
            lambda: reader.get(namespaced("pods", namespace))["items"] == [],
            timeout=10,
            what="the RoleBinding to take effect",
        )
        with pytest.raises(ApiError) as still_forbidden:
            reader.get(namespaced("secrets", namespace))
        assert still_forbidden.value.status == 403
    finally:
        reader.close()
