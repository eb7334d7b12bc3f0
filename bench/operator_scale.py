"""Operator scale benchmark on the real control plane with kwok nodes.

Creates N TrainingJobs at once and measures, per job: CR created -> its attempt Job created, and
CR created -> condition Running=True; then the time until all are Succeeded, and the operator's peak RSS
and CPU seconds (from /proc).

Timestamps are client-side monotonic clocks in this process: "created" is when the create call returned
(the object is committed), "Job seen" when a raw watch on Jobs delivered it. Object timestamps
(creationTimestamp) have 1 s granularity and are never used. The apiserver's request counters
(apiserver_request_total) are read before the creates and after the last Succeeded, so the report says how
many requests of each verb and resource the run cost, per TrainingJob; writes to TrainingJobs and the
operator's Events are the operator's own. The VM is shared (control plane, operator, this client, and
whatever else runs there): the load average and the machine's busy CPU share during the run are reported.

Usage:

    .venv/bin/python bench/operator_scale.py --jobs 200 [--jobs 1000] [--unrelated 5000] [--without-kopf]
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
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from kiln.testing.controlplane import ControlPlane, ControlPlaneConfig
from kiln.testing.kube import KubeClient, namespaced
from kiln.testing.processes import free_port, wait_until

REPO = Path(__file__).resolve().parents[1]

NAMESPACE = "bench"
PREFIXES = ("kiln_operator_reconcile_total", "kiln_operator_reconcile_duration_seconds_sum")
KILN_OPERATOR = ("-m", "kiln.cli", "operator")
"""How a user starts the operator: `kiln operator`."""
WITHOUT_KOPF = (str(REPO / "bench" / "operator_without_kopf.py"),)
"""The same reconciling machinery without kopf, aiohttp and typer, to measure what they weigh (that file)."""


def trainingjob(name: str, namespace: str = NAMESPACE) -> dict[str, Any]:
    """A one-node, one-GPU TrainingJob (bench/operator_vs_kubeflow.py gives its PyTorchJobs the same pod)."""
    return {
        "apiVersion": "kiln.dev/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "task": "classification",
            "model": {"architecture": "resnet18"},
            "data": {"train": {"uri": "s3://bench/train"}},
            "epochs": 1,
            "resources": {"nodes": 1, "gpusPerNode": 1},
        },
    }


class Watcher(threading.Thread):
    """Stamps, from a raw watch stream, when each object first shows up or reaches a condition.

    Raw JSON lines, not the client library's models: decoding 200 Jobs into V1Job objects costs CPU that
    the shared cores need, and would delay the stamp it is measuring.
    """

    def __init__(self, kubeconfig: Path, path: str, stamp: Any) -> None:
        super().__init__(daemon=True)
        self.kubeconfig, self.path, self.stamp = kubeconfig, path, stamp
        self.ready = threading.Event()

    def run(self) -> None:
        from kubernetes import config

        api = config.new_client_from_config(config_file=str(self.kubeconfig))
        while True:
            try:
                response = api.call_api(
                    *api.param_serialize(
                        "GET", self.path, query_params=[("watch", "true"), ("timeoutSeconds", "600")],
                        header_params={"Accept": "application/json"}, auth_settings=["BearerToken"],
                    ),
                    _request_timeout=None,
                )  # fmt: skip
                self.ready.set()
                buffer = b""
                for chunk in response.response.stream(64 * 1024, decode_content=False):
                    buffer += chunk
                    *lines, buffer = buffer.split(b"\n")
                    for line in lines:
                        if line.strip():
                            at = time.monotonic()
                            self.stamp(at, json.loads(line)["object"])
            except Exception:  # the stream ends with the cluster; any other gap is re-watched
                time.sleep(0.5)


def apiserver_requests(kube: KubeClient) -> Counter[tuple[str, str]]:
    """apiserver_request_total summed by (verb, resource[/subresource]), from the apiserver's /metrics."""
    response = kube._pool.request("GET", f"{kube.server}/metrics", headers=kube._headers)
    tally: Counter[tuple[str, str]] = Counter()
    for line in response.data.decode().splitlines():
        if not line.startswith("apiserver_request_total{"):
            continue
        labels = dict(part.split("=", 1) for part in line[line.index("{") + 1 : line.rindex("}")].split(","))
        labels = {k: v.strip('"') for k, v in labels.items()}
        resource = labels.get("resource", "") + (f"/{labels['subresource']}" if labels.get("subresource") else "")
        tally[(labels.get("verb", ""), resource)] += int(float(line.rsplit(" ", 1)[1]))
    return tally


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU jiffies of the whole machine, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


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


def create_namespace(cluster: ControlPlane, namespace: str) -> None:
    cluster.create_namespace(namespace)


def create_unrelated(cluster: ControlPlane, count: int) -> None:
    """Another workload's objects, of the kinds the operator watches: ``count`` ConfigMaps of 4 KB and a tenth as
    many suspended Jobs (nothing runs), in their own namespace. A real cluster holds many; the operator asks the
    apiserver for its own children only (watches.OWN_CHILDREN)."""
    create_namespace(cluster, "unrelated")
    client = KubeClient(cluster.kubeconfig, pool_size=8)
    pod = {"restartPolicy": "Never", "containers": [{"name": "c", "image": "busybox", "command": ["true"]}]}

    def create(index: int) -> None:
        client.create(
            namespaced("configmaps", "unrelated"),
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": f"other-{index:05d}", "labels": {"app": "x"}},
                "data": {"blob": "x" * 4096},
            },
        )
        if index % 10 == 0:
            client.create(
                namespaced("jobs", "unrelated", group_version="batch/v1"),
                {
                    "apiVersion": "batch/v1",
                    "kind": "Job",
                    "metadata": {"name": f"other-{index:05d}"},
                    "spec": {"suspend": True, "template": {"spec": pod}},
                },
            )

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(create, range(count)))


def start_kiln_operator(
    cluster: ControlPlane, metrics_port: int, command: tuple[str, ...] = KILN_OPERATOR
) -> subprocess.Popen[bytes]:
    """Kiln's operator as a user runs it (`kiln operator`), its log in the temp dir (one file per run: benchmarks
    on a shared VM overlap). The leader Lease is lengthened: a burst that saturates the shared cores delayed a
    renewal past the default 8 s deadline, and the operator stopped itself mid-run as a leader that lost its Lease
    must (nothing here measures failover)."""
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig), "KILN_OPERATOR_METRICS_PORT": str(metrics_port),
           "KILN_OPERATOR_LEASE_DURATION_S": "120", "KILN_OPERATOR_RENEW_DEADLINE_S": "100"}  # fmt: skip
    log = tempfile.NamedTemporaryFile(prefix="kiln-bench-operator-", suffix=".log", delete=False)  # noqa: SIM115
    print(f"operator log: {log.name}", file=sys.stderr)
    return subprocess.Popen([sys.executable, *command], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)


def create_burst(
    client: KubeClient, path: str, bodies: dict[str, dict[str, Any]]
) -> tuple[dict[str, float], dict[str, float]]:
    """Create every body at once. Returns (sent, created): when each create call started and returned, by name,
    on the monotonic clock; "created" is when the object is committed."""
    sent: dict[str, float] = {}
    created: dict[str, float] = {}

    def create(name: str) -> None:
        sent[name] = time.monotonic()
        client.create(path, bodies[name])
        created[name] = time.monotonic()

    # 16 threads over KubeClient's 4 pooled connections: a burst as from several kubectl users.
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(create, bodies))
    return sent, created


def run(jobs: int, nodes: int, unrelated: int = 0, command: tuple[str, ...] = KILN_OPERATOR) -> dict[str, Any]:
    cluster = ControlPlane(ControlPlaneConfig(fake_gpu_nodes=nodes, executor=False)).start()
    try:
        cluster.install_crds(sorted((REPO / "crds").glob("*.yaml")))
        create_namespace(cluster, NAMESPACE)
        if unrelated:
            create_unrelated(cluster, unrelated)
        port = free_port()
        operator = start_kiln_operator(cluster, port, command)
        time.sleep(3 if not unrelated else 15)  # its start-up: the Lease, then the first LIST of each watch
        rss_idle, cpu_idle = proc_stats(operator.pid)

        job_seen: dict[str, float] = {}
        running: dict[str, float] = {}
        succeeded: dict[str, float] = {}

        def on_job(at: float, obj: dict[str, Any]) -> None:
            owner = (obj["metadata"].get("labels") or {}).get("kiln.dev/training-job")
            if owner:
                job_seen.setdefault(owner, at)

        def on_tj(at: float, obj: dict[str, Any]) -> None:
            name = obj["metadata"]["name"]
            for condition in (obj.get("status") or {}).get("conditions", []):
                if condition["status"] == "True" and condition["type"] == "Running":
                    running.setdefault(name, at)
                if condition["status"] == "True" and condition["type"] == "Succeeded":
                    succeeded.setdefault(name, at)

        tj_path = f"/apis/kiln.dev/v1alpha1/namespaces/{NAMESPACE}/trainingjobs"
        watchers = [
            Watcher(cluster.kubeconfig, f"/apis/batch/v1/namespaces/{NAMESPACE}/jobs", on_job),
            Watcher(cluster.kubeconfig, tj_path, on_tj),
        ]
        for watcher in watchers:
            watcher.start()
            watcher.ready.wait(30)
        time.sleep(1)

        client = KubeClient(cluster.kubeconfig)
        requests_before, cpu_before, load_before = apiserver_requests(client), machine_cpu(), os.getloadavg()
        operator_cpu_before = proc_stats(operator.pid)[1]

        bodies = {f"bench-{index:04d}": trainingjob(f"bench-{index:04d}") for index in range(jobs)}
        started = time.monotonic()
        sent, created = create_burst(client, tj_path, bodies)
        created_all = time.monotonic() - started
        # 200 jobs took 4 minutes on the saturated shared VM: allow 3 s a job, not a flat 10 minutes.
        wait_until(lambda: len(succeeded) >= jobs, timeout=max(600, 3 * jobs), interval=0.5, what="all Succeeded",
                   on_tick=lambda: None)  # fmt: skip
        all_done = time.monotonic() - started
        cpu_after, load_after = machine_cpu(), os.getloadavg()
        requests = apiserver_requests(client) - requests_before
        rss_peak, cpu = proc_stats(operator.pid)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            reconciles = [line for line in response.read().decode().splitlines()
                          if line.startswith(PREFIXES)]  # fmt: skip
        events = client.get(f"/api/v1/namespaces/{NAMESPACE}/events")["items"]
        operator_events = sum(1 for e in events if e.get("reportingComponent") == "kiln-operator"
                              or (e.get("source") or {}).get("component") == "kiln-operator")  # fmt: skip
        operator.terminate()
        operator.wait(timeout=30)

        to_job = [job_seen[n] - created[n] for n in created if n in job_seen]
        to_running = [running[n] - created[n] for n in created if n in running]
        create_calls = [created[n] - sent[n] for n in created]
        writes = {f"{verb} {res}": n for (verb, res), n in sorted(requests.items())
                  if verb in ("POST", "PATCH", "PUT", "DELETE") and n}  # fmt: skip
        reads = {f"{verb} {res}": n for (verb, res), n in sorted(requests.items())
                 if verb in ("GET", "LIST") and n}  # fmt: skip
        tj_writes = sum(n for (verb, res), n in requests.items()
                        if verb in ("PATCH", "PUT") and res.startswith("trainingjobs"))  # fmt: skip
        busy = (cpu_after[0] - cpu_before[0]) / max(1, cpu_after[1] - cpu_before[1])
        return {
            "jobs": jobs,
            "kwok_nodes": nodes,
            "machine": {
                "cpus": os.cpu_count(),
                "loadavg_1m_before": round(load_before[0], 2),
                "loadavg_1m_after": round(load_after[0], 2),
                "busy_cpu_share_during_run": round(busy, 2),
            },
            "create_all_s": round(created_all, 2),
            "create_call_p50_s": round(statistics.median(create_calls), 3),
            "create_call_p99_s": round(percentile(create_calls, 99), 3),
            "cr_to_job_p50_s": round(statistics.median(to_job), 3),
            "cr_to_job_p99_s": round(percentile(to_job, 99), 3),
            "cr_to_job_max_s": round(max(to_job), 3),
            "jobs_observed": len(to_job),
            "cr_to_running_p50_s": round(statistics.median(to_running), 3) if to_running else None,
            "cr_to_running_p99_s": round(percentile(to_running, 99), 3) if to_running else None,
            "running_observed": len(to_running),
            "all_succeeded_s": round(all_done, 1),
            "unrelated_configmaps": unrelated,
            "operator_cpu_at_start_s": round(cpu_idle, 1),
            "operator_rss_idle_mb": round(rss_idle, 1),
            "operator_rss_peak_mb": round(rss_peak, 1),
            "operator_cpu_s": round(cpu - operator_cpu_before, 1),
            "operator_tj_patches_per_job": round(tj_writes / jobs, 2),
            "operator_events_per_job": round(operator_events / jobs, 2),
            "apiserver_writes": writes,
            "apiserver_reads": reads,
            "reconciles": reconciles,
        }
    finally:
        cluster.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--nodes", type=int, default=0, help="kwok GPU nodes (default: enough for all jobs)")
    parser.add_argument(
        "--unrelated", type=int, default=0, help="another workload's ConfigMaps (and a tenth as many Jobs) first"
    )
    parser.add_argument("--without-kopf", action="store_true",
                        help="run bench/operator_without_kopf.py instead of `kiln operator`")  # fmt: skip
    args = parser.parse_args()
    nodes = args.nodes or max(2, -(-args.jobs // 100))
    command = WITHOUT_KOPF if args.without_kopf else KILN_OPERATOR
    print(json.dumps({"operator": " ".join(command), **run(args.jobs, nodes, args.unrelated, command)}, indent=2))


if __name__ == "__main__":
    main()
