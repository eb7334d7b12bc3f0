"""pytest fixtures for the real control plane; enable with ``pytest_plugins = ["kiln.testing.fixtures"]``.

- ``cluster`` (session): a started ``ControlPlane``. Missing binaries FAIL the tests that use it,
  unless ``KILN_SKIP_CONTROLPLANE=1`` (then they skip). ``KILN_KEEP_CONTROLPLANE=1`` keeps its
  directory (logs, certs, pod files) after the run.
- ``namespace`` (function): a fresh namespace whose ``default`` ServiceAccount exists; deleted after.
- ``executor_pod``: a factory for pod specs that run on the local executor node.
- ``kueue`` (module): the real Kueue manager against ``cluster`` (``kiln.testing.kueue``), only for the modules
  that ask for it, and stopped after them: every other module's queued Jobs never meet a real Kueue.
"""

from __future__ import annotations

import os
import re
import signal
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from kiln.testing.binaries import ControlPlaneUnavailable
from kiln.testing.controlplane import ControlPlane, ControlPlaneConfig
from kiln.testing.kube import JSON, ApiError
from kiln.testing.kueue import Kueue, KueueUnavailable
from kiln.testing.nodes import executor_node_selector, pod_tolerations_for_executor


@pytest.fixture(scope="session")
def cluster() -> Iterator[ControlPlane]:
    if os.environ.get("KILN_SKIP_CONTROLPLANE") == "1":
        pytest.skip("KILN_SKIP_CONTROLPLANE=1: not starting the control plane")
    _teardown_on_sigterm()
    config = ControlPlaneConfig(keep_root=os.environ.get("KILN_KEEP_CONTROLPLANE") == "1")
    try:
        control_plane = ControlPlane(config).start()
    except ControlPlaneUnavailable as error:
        pytest.fail(f"{error}\n(set KILN_SKIP_CONTROLPLANE=1 to skip these tests instead)", pytrace=False)
    try:
        yield control_plane
    finally:
        control_plane.stop()


def _teardown_on_sigterm() -> None:
    """Let ``timeout pytest`` (SIGTERM) run fixture teardown, as Ctrl-C does, instead of dying on the spot.

    The components would die with pytest anyway (``PR_SET_PDEATHSIG``); this also removes their files.
    """
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, signal.default_int_handler)


@pytest.fixture
def namespace(cluster: ControlPlane, request: pytest.FixtureRequest) -> Iterator[str]:
    """A namespace named after the test, ready for pods (its ``default`` ServiceAccount exists)."""
    slug = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:40].rstrip("-")
    name = f"{slug}-{uuid.uuid4().hex[:5]}"
    cluster.create_namespace(name)
    yield name
    try:
        cluster.kube.delete(f"/api/v1/namespaces/{name}")
    except ApiError as error:
        if error.status != 404:
            raise


@pytest.fixture(scope="module")
def kueue(cluster: ControlPlane) -> Iterator[Kueue]:
    """Kueue for one test module; ``kueue.queue(namespace, gpus=...)`` gives a test its own quota."""
    manager = Kueue(cluster)
    try:
        manager.start()
    except (KueueUnavailable, FileNotFoundError) as error:
        pytest.fail(str(error), pytrace=False)
    try:
        yield manager
    finally:
        manager.stop()


@pytest.fixture
def executor_pod() -> Callable[..., JSON]:
    """Build a Pod manifest that the scheduler places on the local executor node."""

    def build(name: str, command: list[str], **container: Any) -> JSON:
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name},
            "spec": {
                "restartPolicy": "Never",
                "nodeSelector": executor_node_selector(),
                "tolerations": pod_tolerations_for_executor(),
                "containers": [{"name": "main", "image": "python:3.11", "command": command, **container}],
            },
        }

    return build
