"""Kiln's operator side by side with Kubeflow's training-operator v1.8.1, on one control plane with kwok nodes.

The same N one-node, one-GPU jobs go in twice, one operator at a time: as Kiln TrainingJobs and as PyTorchJobs
(one Master replica; the same image and resources as a TrainingJob's pod, so the scheduler and kwok treat the
two alike). Per job: CR created -> its pod created (a raw watch on pods, for both; Kiln's operator makes a
batch/v1 Job whose pod the Job controller makes, the peer makes the pod itself), then the time until every CR
is Succeeded, and the operator's peak RSS and CPU seconds (from /proc) over the burst. The report gives each
figure for both operators and the ratio Kiln/peer (below 1: Kiln is lower, i.e. faster or lighter).

Each side runs in its own namespace; the first is deleted, pods and all, before the second starts, so both
schedule onto the same empty kwok nodes. Clocks and caveats are bench/operator_scale.py's. The peer is built
by tools/install-training-operator.sh and run by kiln.testing.training_operator (webhook served on loopback).

Usage:

    .venv/bin/python bench/operator_vs_kubeflow.py --jobs 200 [--order kubeflow,kiln] [--kiln-without-kopf]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from operator_scale import (
    KILN_OPERATOR,
    REPO,
    WITHOUT_KOPF,
    Watcher,
    apiserver_requests,
    create_burst,
    create_namespace,
    machine_cpu,
    percentile,
    proc_stats,
    start_kiln_operator,
    trainingjob,
)

from kiln.api.contract import DEFAULT_TRAINER_IMAGE, Label
from kiln.operator.render import resource_amounts
from kiln.testing.controlplane import ControlPlane, ControlPlaneConfig
from kiln.testing.kube import JSON, KubeClient, namespaced
from kiln.testing.processes import free_port, wait_until
from kiln.testing.training_operator import (
    PEER_POD_OWNER_KINDS,
    TrainingOperator,
    pytorch_job,
    pytorch_jobs_path,
    succeeded,
)

PEER_JOB_NAME_LABEL = "training.kubeflow.org/job-name"  # on every pod the training-operator creates


@dataclass(frozen=True)
class Side:
    name: str
    namespace: str
    cr_path: str
    body: Callable[[str], JSON]
    pod_owner_label: str
    start: Callable[[ControlPlane], tuple[int, Callable[[], None]]]
    """Start the operator; returns its pid and how to stop it."""
    intermediate: str | None = None
    """Where the operator's own child that makes the pod is listed (Kiln: batch/v1 Jobs), to split CR -> pod."""


def _start_kiln(command: tuple[str, ...], cluster: ControlPlane) -> tuple[int, Callable[[], None]]:
    process = start_kiln_operator(cluster, free_port(), command)

    def stop() -> None:
        process.terminate()
        process.wait(timeout=30)

    return process.pid, stop


def _start_peer(cluster: ControlPlane) -> tuple[int, Callable[[], None]]:
    peer = TrainingOperator(cluster).start()
    return peer.pid, peer.stop


def kiln_side(command: tuple[str, ...] = KILN_OPERATOR) -> Side:
    namespace = "bench-kiln"
    return Side("kiln", namespace, f"/apis/kiln.dev/v1alpha1/namespaces/{namespace}/trainingjobs",
                lambda name: trainingjob(name, namespace), Label.TRAINING_JOB, functools.partial(_start_kiln, command),
                f"/apis/batch/v1/namespaces/{namespace}/jobs")  # fmt: skip


def peer_side() -> Side:
    namespace = "bench-kubeflow"
    # A TrainingJob with gpusPerNode 1 and no cpu/memory renders exactly these resources on its pod.
    resources = resource_amounts(1, None, None)
    return Side("kubeflow", namespace, pytorch_jobs_path(namespace),
                lambda name: pytorch_job(name, namespace, image=DEFAULT_TRAINER_IMAGE, resources=resources),
                PEER_JOB_NAME_LABEL, _start_peer)  # fmt: skip


def measure(cluster: ControlPlane, side: Side, jobs: int) -> dict[str, Any]:
    create_namespace(cluster, side.namespace)
    pid, stop = side.start(cluster)
    try:
        time.sleep(3)
        rss_idle, _ = proc_stats(pid)
        pod_seen: dict[str, float] = {}
        child_seen: dict[str, float] = {}
        done: dict[str, float] = {}

        def first_seen(seen: dict[str, float]) -> Callable[[float, JSON], None]:
            def stamp(at: float, obj: JSON) -> None:
                owner = (obj["metadata"].get("labels") or {}).get(side.pod_owner_label)
                if owner:
                    seen.setdefault(owner, at)

            return stamp

        def on_cr(at: float, obj: JSON) -> None:
            if succeeded(obj):
                done.setdefault(obj["metadata"]["name"], at)

        watchers = [Watcher(cluster.kubeconfig, namespaced("pods", side.namespace), first_seen(pod_seen)),
                    Watcher(cluster.kubeconfig, side.cr_path, on_cr)]  # fmt: skip
        if side.intermediate:
            watchers.append(Watcher(cluster.kubeconfig, side.intermediate, first_seen(child_seen)))
        for watcher in watchers:
            watcher.start()
            watcher.ready.wait(30)
        time.sleep(1)

        client = KubeClient(cluster.kubeconfig)
        requests_before, cpu_before, load_before = apiserver_requests(client), machine_cpu(), os.getloadavg()
        operator_cpu_before = proc_stats(pid)[1]
        bodies = {f"{side.name}-{index:04d}": side.body(f"{side.name}-{index:04d}") for index in range(jobs)}
        started = time.monotonic()
        _, created = create_burst(client, side.cr_path, bodies)
        wait_until(lambda: len(done) >= jobs, timeout=900, interval=0.5, what=f"{side.name}: all Succeeded")
        all_done = time.monotonic() - started
        cpu_after, load_after = machine_cpu(), os.getloadavg()
        rss_peak, cpu = proc_stats(pid)
        requests = apiserver_requests(client) - requests_before
    finally:
        stop()
    to_pod = [pod_seen[n] - created[n] for n in created if n in pod_seen]
    to_child = [child_seen[n] - created[n] for n in created if n in child_seen]
    # Everyone's writes (operator, Job controller, scheduler, kwok, this client): the work the cluster did per job.
    writes = sum(n for (verb, _), n in requests.items() if verb in ("POST", "PATCH", "PUT", "DELETE"))
    reads = sum(n for (verb, _), n in requests.items() if verb in ("GET", "LIST"))
    return {
        "loadavg_1m_before": round(load_before[0], 2),
        "loadavg_1m_after": round(load_after[0], 2),
        "busy_cpu_share_during_run": round((cpu_after[0] - cpu_before[0]) / max(1, cpu_after[1] - cpu_before[1]), 2),
        "cr_to_pod_p50_s": round(statistics.median(to_pod), 3),
        "cr_to_pod_p99_s": round(percentile(to_pod, 99), 3),
        "pods_observed": len(to_pod),
        **(
            {
                "cr_to_job_p50_s": round(statistics.median(to_child), 3),
                "cr_to_job_p99_s": round(percentile(to_child, 99), 3),
            }
            if to_child
            else {}
        ),
        "all_succeeded_s": round(all_done, 1),
        "operator_rss_idle_mb": round(rss_idle, 1),
        "operator_rss_peak_mb": round(rss_peak, 1),
        "operator_cpu_s": round(cpu - operator_cpu_before, 1),
        "apiserver_writes_per_job": round(writes / jobs, 1),
        "apiserver_writes": {
            f"{verb} {res}": n
            for (verb, res), n in sorted(requests.items())
            if verb in ("POST", "PATCH", "PUT", "DELETE") and n
        },
        # Everyone's GETs and LISTs (watches are not counted): the operator's are most of them.
        "apiserver_reads_per_job": round(reads / jobs, 1),
        "apiserver_reads": {
            f"{verb} {res}": n for (verb, res), n in sorted(requests.items()) if verb in ("GET", "LIST") and n
        },
    }


def delete_namespace(cluster: ControlPlane, namespace: str) -> None:
    """Delete it and wait until it is gone: its Succeeded pods must not linger on the nodes the next side uses."""
    cluster.kube.delete(f"/api/v1/namespaces/{namespace}")
    wait_until(lambda: not cluster.kube.exists(f"/api/v1/namespaces/{namespace}"), timeout=300, interval=1,
               what=f"namespace {namespace} deleted")  # fmt: skip


RATIOS = (
    "cr_to_pod_p50_s",
    "cr_to_pod_p99_s",
    "all_succeeded_s",
    "operator_rss_peak_mb",
    "operator_cpu_s",
    "apiserver_writes_per_job",
)


def run(
    jobs: int, nodes: int, order: list[str], job_syncs: int | None = None, command: tuple[str, ...] = KILN_OPERATOR
) -> dict[str, Any]:
    sides = {side.name: side for side in (kiln_side(command), peer_side())}
    flags = () if job_syncs is None else (f"--concurrent-job-syncs={job_syncs}",)
    config = ControlPlaneConfig(fake_gpu_nodes=nodes, executor=False, kwok_completed_owner_kinds=PEER_POD_OWNER_KINDS,
                                controller_manager_flags=flags)  # fmt: skip
    cluster = ControlPlane(config).start()
    results: dict[str, Any] = {}
    try:
        cluster.install_crds(sorted((REPO / "crds").glob("*.yaml")))
        for index, name in enumerate(order):
            if index:
                delete_namespace(cluster, sides[order[index - 1]].namespace)
            results[name] = measure(cluster, sides[name], jobs)
    finally:
        cluster.stop()
    kiln, peer = results["kiln"], results["kubeflow"]
    return {
        "jobs": jobs,
        "kwok_nodes": nodes,
        "order": order,
        "kiln_operator": " ".join(command),
        "concurrent_job_syncs": job_syncs or "default (5)",
        "cpus": os.cpu_count(),
        **results,
        "ratio_kiln_over_kubeflow": {key: round(kiln[key] / peer[key], 2) if peer[key] else None for key in RATIOS},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--nodes", type=int, default=0, help="kwok GPU nodes (default: enough for all jobs)")
    parser.add_argument("--order", default="kiln,kubeflow", help="which operator runs first (comma-separated)")
    parser.add_argument("--concurrent-job-syncs", type=int, default=None, dest="job_syncs",
                        help="kube-controller-manager's Job sync workers (default: its own, 5); only Kiln's pods "
                        "go through the Job controller")  # fmt: skip
    parser.add_argument("--kiln-without-kopf", action="store_true",
                        help="Kiln's side runs bench/operator_without_kopf.py instead of `kiln operator`")  # fmt: skip
    args = parser.parse_args()
    order = args.order.split(",")
    if sorted(order) != ["kiln", "kubeflow"]:
        parser.error(f"--order: {args.order!r} must name kiln and kubeflow once each")
    nodes = args.nodes or max(2, -(-args.jobs // 100))
    command = WITHOUT_KOPF if args.kiln_without_kopf else KILN_OPERATOR
    print(json.dumps(run(args.jobs, nodes, order, args.job_syncs, command), indent=2))


if __name__ == "__main__":
    main()
