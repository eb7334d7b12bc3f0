"""Two executor pods of one Indexed Job form a torchrun group through their cluster DNS names."""

from __future__ import annotations

import pytest

from kiln.testing.controlplane import ControlPlane
from kiln.testing.kube import JSON, namespaced
from kiln.testing.nodes import executor_node_selector, pod_tolerations_for_executor
from kiln.testing.processes import free_port, wait_until

pytestmark = [pytest.mark.controlplane, pytest.mark.slow]

ALL_REDUCE = """
import torch, torch.distributed as dist
dist.init_process_group("gloo")
total = torch.tensor([dist.get_rank() + 1.0])
dist.all_reduce(total)
print(f"rank {dist.get_rank()}/{dist.get_world_size()} sum {total.item():.0f}", flush=True)
dist.destroy_process_group()
"""


def torchrun_job(name: str, service: str, port: int) -> JSON:
    command = [
        "torchrun", "--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=static",
        "--master-addr", f"{name}-0.{service}", "--master-port", str(port),
        "--node-rank", "$(JOB_COMPLETION_INDEX)", "--no-python", "python", "-c", ALL_REDUCE,
    ]  # fmt: skip
    pod_spec = {
        "restartPolicy": "Never", "subdomain": service, "nodeSelector": executor_node_selector(),
        "tolerations": pod_tolerations_for_executor(),
        "containers": [{"name": "trainer", "image": "kiln/trainer:dev", "command": command}],
    }  # fmt: skip
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name},
            "spec": {"completions": 2, "parallelism": 2, "completionMode": "Indexed", "backoffLimit": 0,
                     "template": {"spec": pod_spec}}}  # fmt: skip


def test_torchrun_static_rendezvous_across_two_pods(cluster: ControlPlane, namespace: str) -> None:
    pytest.importorskip("torch")
    cluster.kube.create(namespaced("services", namespace), {
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "workers"},
        "spec": {"clusterIP": "None", "selector": {"job-name": "ddp"}},
    })  # fmt: skip

    cluster.kube.create(
        namespaced("jobs", namespace, group_version="batch/v1"), torchrun_job("ddp", "workers", free_port())
    )

    def job_status() -> JSON:
        return cluster.kube.get(namespaced("jobs", namespace, "ddp", group_version="batch/v1")).get("status", {})

    def fail_fast() -> None:
        if job_status().get("failed"):
            pytest.fail(f"a torchrun pod failed; pod logs are under {cluster.executor_root}/pods/{namespace}")

    wait_until(
        lambda: job_status().get("succeeded") == 2,
        timeout=180,
        what="both torchrun pods to succeed",
        interval=1,
        on_tick=fail_fast,
    )
    pods = cluster.kube.get(namespaced("pods", namespace), labelSelector="job-name=ddp")["items"]
    logs = sorted(cluster.pod_log(namespace, pod["metadata"]["name"]) for pod in pods)
    assert "rank 0/2 sum 3" in logs[0] + logs[1]
    assert "rank 1/2 sum 3" in logs[0] + logs[1]
