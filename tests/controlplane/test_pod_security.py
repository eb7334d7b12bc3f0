"""PodSecurity admission is live: a restricted namespace rejects a privileged pod."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from kiln.testing.controlplane import ControlPlane
from kiln.testing.kube import JSON, ApiError, namespaced

pytestmark = pytest.mark.controlplane


def test_restricted_namespace_rejects_a_privileged_pod(
    cluster: ControlPlane,
    namespace: str,
    executor_pod: Callable[..., JSON],
) -> None:
    cluster.kube.patch(
        f"/api/v1/namespaces/{namespace}",
        {"metadata": {"labels": {"pod-security.kubernetes.io/enforce": "restricted"}}},
    )
    pod = executor_pod("privileged", ["true"], securityContext={"privileged": True})

    with pytest.raises(ApiError) as rejected:
        cluster.kube.create(namespaced("pods", namespace), pod)

    assert rejected.value.status == 403
    assert 'violates PodSecurity "restricted:latest"' in str(rejected.value)
    assert "privileged" in str(rejected.value)
