"""Shared pytest configuration.

Fixtures live in importable plugin modules and are registered here, so each owner keeps
theirs in one place:
- ``kiln.testing.fixtures``: the real control plane (``cluster``, ``namespace``, ``executor_pod``).
- ``kiln.testing.s3``: a real S3-protocol server (``s3_server``, ``s3_bucket``), moto in server mode.

Kiln's own CRDs, as committed in crds/, are installed once per session by ``kiln_crds``.
"""

from __future__ import annotations

import os
from pathlib import Path

# Before anything imports torch: one intra-op thread per test process. Under `make test` the torch tests share the
# 2 cores with the other xdist worker's control plane, and torch's default of a thread per core then spins against
# it: the segmentation run in tests/trainer took 86 s with two threads and 20 s with one, beside two busy
# processes (16.6 s on an idle machine). The trainer's subprocesses already get OMP_NUM_THREADS=1 (trainer_testkit).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest

from kiln.testing.controlplane import ControlPlane

pytest_plugins = ["kiln.testing.fixtures", "kiln.testing.s3"]

CRDS = Path(__file__).parents[1] / "crds"


@pytest.fixture(scope="session")
def kiln_crds(cluster: ControlPlane) -> None:
    cluster.install_crds(sorted(CRDS.glob("*.yaml")))


# tryfirst: the marks must be on the items before xdist's worker reads them in its own
# pytest_collection_modifyitems (it turns them into the nodeid suffix that loadgroup schedules by).
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under pytest-xdist (``make test`` runs two workers), every test of the real control plane runs on one
    worker: the local executor runs pods as host processes on the fixed pod ports (rendezvous 29500, metrics
    9400), so two clusters' pods would collide, and one session cluster serves them all."""
    for item in items:
        uses_cluster = "cluster" in getattr(item, "fixturenames", ()) or item.get_closest_marker("controlplane")
        if uses_cluster:
            item.add_marker(pytest.mark.xdist_group("controlplane"))
