"""Operator scale benchmark on the real control plane with kwok nodes.

Creates N TrainingJobs at once and measures, per job: CR created -> its attempt Job created, and
CR created -> condition Running=True; then the time until all are Succeeded, and the operator's peak RSS
and CPU seconds (from /proc). Usage:

    .venv/bin/python bench/operator_scale.py --jobs 200 [--jobs 1000]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from kiln.testing.controlplane import ControlPlane, ControlPlaneConfig
from kiln.testing.kube import KubeClient, namespaced
from kiln.testing.processes import free_port, wait_until

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "operator"))
from conftest import crd_documents  # noqa: E402

NAMESPACE = "bench"
PREFIXES = ("kiln_operator_reconcile_total", "kiln_operator_reconcile_duration_seconds_sum")


def trainingjob(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "kiln.dev/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "task": "classification",
            "model": {"architecture": "resnet18"},
            "data": {"train": {"uri": "s3://bench/train"}},
            "epochs": 1,
            "resources": {"nodes": 1, "gpusPerNode": 1},
        },
    }


class Watcher(threading.Thread):
    """Stamps, from a watch stream, when each object first shows up or reaches a condition."""

    def __init__(self, kubeconfig: Path, kind: str, stamp: Any) -> None:
        super().__init__(daemon=True)
        self.kubeconfig, self.kind, self.stamp = kubeconfig, kind, stamp

    def run(self) -> None:
        from kubernetes import client, config, watch

        api = config.new_client_from_config(config_file=str(self.kubeconfig))
        if self.kind == "jobs":
            lister, kwargs = client.BatchV1Api(api).list_namespaced_job, {"namespace": NAMESPACE}
        else:
            lister = client.CustomObjectsApi(api).list_namespaced_custom_object
            kwargs = {"group": "kiln.dev", "version": "v1alpha1", "namespace": NAMESPACE, "plural": "trainingjobs"}
        while True:
            try:
                for event in watch.Watch().stream(lister, timeout_seconds=300, **kwargs):
                    obj = event["object"]
                    self.stamp(time.monotonic(), obj if isinstance(obj, dict) else api.sanitize_for_serialization(obj))
            except Exception:  # the stream ends with the cluster; any other gap is re-listed above
                time.sleep(0.5)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def proc_stats(pid: int) -> tuple[float, float]:
    """(peak RSS in MB, CPU seconds) of a process."""
    status = Path(f"/proc/{pid}/status").read_text()
    hwm = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return hwm / 1024, (int(fields[11]) + int(fields[12])) / ticks


def run(jobs: int, nodes: int) -> dict[str, Any]:
    cluster = ControlPlane(ControlPlaneConfig(fake_gpu_nodes=nodes, executor=False)).start()
    try:
        for crd in crd_documents():
            cluster.kubectl("apply", "--server-side", "-f", "-", input=json.dumps(crd))
            cluster.kubectl("wait", "--for=condition=Established", f"crd/{crd['metadata']['name']}")
        cluster.kube.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                                   "metadata": {"name": NAMESPACE}})  # fmt: skip
        wait_until(lambda: cluster.kube.exists(namespaced("serviceaccounts", NAMESPACE, "default")), timeout=30,
                   what="namespace ready")  # fmt: skip
        port = free_port()
        env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig), "KILN_OPERATOR_METRICS_PORT": str(port)}
        log = (Path(tempfile.gettempdir()) / "kiln-bench-operator.log").open("wb")
        operator = subprocess.Popen([sys.executable, "-m", "kiln.cli", "operator"], env=env, stdout=log,
                                    stderr=subprocess.STDOUT, cwd=REPO)  # fmt: skip
        time.sleep(3)
        rss_idle, _ = proc_stats(operator.pid)

        created: dict[str, float] = {}
        job_seen: dict[str, float] = {}
        running: dict[str, float] = {}
        succeeded: dict[str, float] = {}

        def on_job(at: float, obj: dict[str, Any]) -> None:
            owner = obj["metadata"].get("labels", {}).get("kiln.dev/training-job")
            if owner:
                job_seen.setdefault(owner, at)

        def on_tj(at: float, obj: dict[str, Any]) -> None:
            name = obj["metadata"]["name"]
            for condition in obj.get("status", {}).get("conditions", []):
                if condition["status"] == "True" and condition["type"] == "Running":
                    running.setdefault(name, at)
                if condition["status"] == "True" and condition["type"] == "Succeeded":
                    succeeded.setdefault(name, at)

        watchers = [Watcher(cluster.kubeconfig, "jobs", on_job), Watcher(cluster.kubeconfig, "tj", on_tj)]
        for watcher in watchers:
            watcher.start()
        time.sleep(1)

        tj_path = f"/apis/kiln.dev/v1alpha1/namespaces/{NAMESPACE}/trainingjobs"
        client = KubeClient(cluster.kubeconfig)

        def create(index: int) -> None:
            name = f"bench-{index:04d}"
            client.create(tj_path, trainingjob(name))
            created[name] = time.monotonic()

        started = time.monotonic()
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(create, range(jobs)))
        created_all = time.monotonic() - started
        wait_until(lambda: len(succeeded) >= jobs, timeout=600, interval=0.5, what="all Succeeded",
                   on_tick=lambda: None)  # fmt: skip
        all_done = time.monotonic() - started
        rss_peak, cpu = proc_stats(operator.pid)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            reconciles = [line for line in response.read().decode().splitlines()
                          if line.startswith(PREFIXES)]  # fmt: skip
        operator.terminate()
        operator.wait(timeout=30)

        to_job = [job_seen[n] - created[n] for n in created if n in job_seen]
        to_running = [running[n] - created[n] for n in created if n in running]
        return {
            "jobs": jobs,
            "kwok_nodes": nodes,
            "create_all_s": round(created_all, 2),
            "cr_to_job_p50_s": round(statistics.median(to_job), 3),
            "cr_to_job_p99_s": round(percentile(to_job, 99), 3),
            "cr_to_running_p50_s": round(statistics.median(to_running), 3) if to_running else None,
            "cr_to_running_p99_s": round(percentile(to_running, 99), 3) if to_running else None,
            "running_observed": len(to_running),
            "all_succeeded_s": round(all_done, 1),
            "operator_rss_idle_mb": round(rss_idle, 1),
            "operator_rss_peak_mb": round(rss_peak, 1),
            "operator_cpu_s": round(cpu, 1),
            "reconciles": reconciles,
        }
    finally:
        cluster.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--nodes", type=int, default=0, help="kwok GPU nodes (default: enough for all jobs)")
    args = parser.parse_args()
    nodes = args.nodes or max(2, -(-args.jobs // 100))
    print(json.dumps(run(args.jobs, nodes), indent=2))


if __name__ == "__main__":
    main()
