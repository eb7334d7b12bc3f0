"""Shared pytest configuration.

Fixtures live in importable plugin modules and are registered here, so each owner keeps
theirs in one place:
- ``kiln.testing.fixtures``: the real control plane (``cluster``, ``namespace``, ``executor_pod``).
- ``kiln.testing.s3``: a real S3-protocol server (``s3_server``, ``s3_bucket``), moto in server mode.

Kiln's own CRDs, as committed in crds/, are installed once per session by ``kiln_crds``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kiln.testing.controlplane import ControlPlane

pytest_plugins = ["kiln.testing.fixtures", "kiln.testing.s3"]

CRDS = Path(__file__).parents[1] / "crds"


@pytest.fixture(scope="session")
def kiln_crds(cluster: ControlPlane) -> None:
    cluster.install_crds(sorted(CRDS.glob("*.yaml")))
