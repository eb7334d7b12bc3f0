"""CR -> Job for Kiln's operator against the floor: the least any controller can do on the same control plane.

Issue 13 asks for a p99 CR -> Job of at most 1 s with 200 TrainingJobs created at once. On a 2-core VM the
apiserver, etcd, the controllers, kwok and the client share the cores, so part of that time is the control
plane's own. This separates the two: each round creates the same N TrainingJobs on a fresh control plane (kwok
nodes, no executor), once answered by `kiln operator`, once by bench/floor_controller.py (a raw watch and one
POST of the very Job Kiln renders, from as many threads as the operator's workers; nothing else). Both are timed
by the same raw watch on Jobs, from the create call's return (bench/operator_scale.py's clocks). A round ends
once every Job is seen; what follows a Job's creation is not measured here. A second raw watch, on the
TrainingJobs, gives ``cr_seen``: when the apiserver delivered each TrainingJob's event, which any controller
waits for before it can act (the operator's own watch received them within 2 ms of it, measured once).

Kiln/floor near 1 means the operator adds little to what the control plane costs; a floor above the target means
no controller meets it on this machine.

    .venv/bin/python bench/cr_to_job_floor.py --jobs 200 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from operator_scale import (
    NAMESPACE,
    REPO,
    Watcher,
    create_burst,
    create_namespace,
    percentile,
    proc_stats,
    start_kiln_operator,
    trainingjob,
)

from kiln.operator.reconcile import resolve_body
from kiln.operator.render import render_job
from kiln.operator.settings import Settings
from kiln.testing.controlplane import ControlPlane, ControlPlaneConfig
from kiln.testing.kube import KubeClient
from kiln.testing.processes import free_port, wait_until


def job_template(directory: Path) -> Path:
    """The Job Kiln's operator renders for a bench TrainingJob, as the floor controller's template."""
    body = trainingjob("template")
    body["metadata"].update(uid="00000000-0000-0000-0000-000000000000", generation=1)
    resolved, errors = resolve_body(body, Settings())
    assert resolved is not None, errors
    path = directory / "job-template.json"
    path.write_text(json.dumps(render_job(resolved, 1, Settings())))
    return path


def start_floor(cluster: ControlPlane, template: Path) -> subprocess.Popen[str]:
    workers = str(Settings().workers)
    controller = subprocess.Popen(
        [sys.executable, str(REPO / "bench" / "floor_controller.py"), str(cluster.kubeconfig), NAMESPACE,
         str(template), "--workers", workers],
        stdout=subprocess.PIPE, text=True, cwd=REPO,
    )  # fmt: skip
    assert controller.stdout is not None and controller.stdout.readline().strip() == "watching"
    return controller


def one_side(side: str, jobs: int, nodes: int, template: Path) -> dict[str, Any]:
    cluster = ControlPlane(ControlPlaneConfig(fake_gpu_nodes=nodes, executor=False)).start()
    try:
        cluster.install_crds(sorted((REPO / "crds").glob("*.yaml")))
        create_namespace(cluster, NAMESPACE)
        controller: subprocess.Popen[Any] = (
            start_kiln_operator(cluster, free_port()) if side == "kiln" else start_floor(cluster, template)
        )
        time.sleep(3)  # the operator's start-up: its Lease, its watches
        job_seen: dict[str, float] = {}

        def on_job(at: float, obj: dict[str, Any]) -> None:
            owner = (obj["metadata"].get("labels") or {}).get("kiln.dev/training-job")
            if owner:
                job_seen.setdefault(owner, at)

        cr_seen: dict[str, float] = {}
        watchers = [Watcher(cluster.kubeconfig, f"/apis/batch/v1/namespaces/{NAMESPACE}/jobs", on_job),
                    Watcher(cluster.kubeconfig, f"/apis/kiln.dev/v1alpha1/namespaces/{NAMESPACE}/trainingjobs",
                            lambda at, obj: cr_seen.setdefault(obj["metadata"]["name"], at))]  # fmt: skip
        for watcher in watchers:
            watcher.start()
            watcher.ready.wait(30)
        time.sleep(1)
        client = KubeClient(cluster.kubeconfig)
        load_before, cpu_before = os.getloadavg()[0], proc_stats(controller.pid)[1]
        bodies = {f"bench-{index:04d}": trainingjob(f"bench-{index:04d}") for index in range(jobs)}
        sent, created = create_burst(client, f"/apis/kiln.dev/v1alpha1/namespaces/{NAMESPACE}/trainingjobs", bodies)
        wait_until(lambda: len(job_seen) >= jobs, timeout=max(300, jobs), interval=0.2, what="every Job")
        rss_peak, cpu = proc_stats(controller.pid)
        controller.terminate()
        controller.wait(timeout=30)
        to_job = [job_seen[n] - created[n] for n in created]
        to_seen = [cr_seen[n] - created[n] for n in created if n in cr_seen]
        calls = [created[n] - sent[n] for n in created]
        return {
            "side": side,
            "loadavg_1m_before": round(load_before, 2),
            "create_call_p50_s": round(statistics.median(calls), 3),
            "create_call_p99_s": round(percentile(calls, 99), 3),
            "cr_seen_p50_s": round(statistics.median(to_seen), 3),
            "cr_seen_p99_s": round(percentile(to_seen, 99), 3),
            "cr_to_job_p50_s": round(statistics.median(to_job), 3),
            "cr_to_job_p99_s": round(percentile(to_job, 99), 3),
            "controller_cpu_s": round(cpu - cpu_before, 1),
            "controller_rss_peak_mb": round(rss_peak, 1),
        }
    finally:
        cluster.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2, help="each round runs both sides, alternating the order")
    args = parser.parse_args()
    nodes = max(2, -(-args.jobs // 100))
    results = []
    with tempfile.TemporaryDirectory(prefix="kiln-floor-") as directory:
        template = job_template(Path(directory))
        for round_ in range(args.rounds):
            for side in ("kiln", "floor") if round_ % 2 == 0 else ("floor", "kiln"):
                results.append(one_side(side, args.jobs, nodes, template) | {"round": round_ + 1})
                print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    ratios = {}
    for key in ("cr_seen_p50_s", "cr_seen_p99_s", "cr_to_job_p50_s", "cr_to_job_p99_s"):
        kiln = statistics.median(r[key] for r in results if r["side"] == "kiln")
        floor = statistics.median(r[key] for r in results if r["side"] == "floor")
        ratios[key.removesuffix("_s") + "_kiln_over_floor"] = round(kiln / floor, 2)
    print(json.dumps({"jobs": args.jobs, "runs": results, "ratios_of_medians": ratios}, indent=2))


if __name__ == "__main__":
    main()
