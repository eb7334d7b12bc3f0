"""How long the whole local control plane takes to start (warm binaries) and to stop.

    .venv/bin/python bench/controlplane_startup.py [--runs 3]

Startup is measured from ``ControlPlane.start()`` until etcd, kube-apiserver (/readyz),
kube-controller-manager, kube-scheduler and kwok are healthy, every node (kwok's fake GPU
nodes and the executor's) is Ready and the ``default`` ServiceAccount exists. Budget: 20 s.
"""

from __future__ import annotations

import argparse
import statistics
import time

from kiln.testing.binaries import find_bin_dir
from kiln.testing.controlplane import ControlPlane

BUDGET_SECONDS = 20.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    print(f"binaries: {find_bin_dir()}")
    startups, teardowns = [], []
    for run in range(1, args.runs + 1):
        cluster = ControlPlane().start()
        stopping = time.monotonic()
        cluster.stop()
        teardowns.append(time.monotonic() - stopping)
        startups.append(cluster.startup_seconds)
        print(f"run {run}: startup {startups[-1]:.1f}s, teardown {teardowns[-1]:.1f}s", flush=True)
        for what, seconds in cluster.startup_timeline.items():
            print(f"    {seconds:5.1f}s  {what}")
    worst = max(startups)
    print(
        f"startup: median {statistics.median(startups):.1f}s, max {worst:.1f}s (budget {BUDGET_SECONDS:.0f}s); "
        f"teardown median {statistics.median(teardowns):.1f}s"
    )
    if worst > BUDGET_SECONDS:
        raise SystemExit(f"startup over budget: {worst:.1f}s > {BUDGET_SECONDS:.0f}s")


if __name__ == "__main__":
    main()
