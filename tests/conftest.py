"""Shared pytest configuration.

Fixtures live in importable plugin modules and are registered here, so each owner keeps
theirs in one place:
- ``kiln.testing.fixtures``: the real control plane (``cluster``, ``namespace``, ``executor_pod``).
- ``kiln.testing.s3``: a real S3-protocol server (``s3_server``, ``s3_bucket``), moto in server mode.

Kiln's own CRDs, as committed in crds/, are installed once per session by ``kiln_crds``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from kiln.testing.controlplane import ControlPlane

pytest_plugins = ["kiln.testing.fixtures", "kiln.testing.s3"]

CRDS = Path(__file__).parents[1] / "crds"


@pytest.fixture(scope="session")
def kiln_crds(cluster: ControlPlane) -> None:
    for path in sorted(CRDS.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        cluster.kubectl("apply", "--server-side", "-f", "-", input=json.dumps(crd))
        cluster.kubectl("wait", "--for=condition=Established", f"crd/{crd['metadata']['name']}", "--timeout=60s")
