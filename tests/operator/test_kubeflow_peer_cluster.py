"""The peer of bench/operator_vs_kubeflow.py, Kubeflow's training-operator (kiln.testing.training_operator), on
the session control plane: its webhook answers on loopback, and one PyTorchJob runs to Succeeded. So the
benchmark's harness (the pinned build, the CRD, the certificates the rotator must accept) cannot rot unseen.

The session cluster's kwok completes only Job-owned pods (the benchmark starts its own cluster with
PEER_POD_OWNER_KINDS), so the test finishes the pod itself, as a kubelet would.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kiln.api.contract import DEFAULT_TRAINER_IMAGE
from kiln.testing import pod_status
from kiln.testing.controlplane import ControlPlane
from kiln.testing.kube import JSON, ApiError, namespaced
from kiln.testing.processes import wait_until
from kiln.testing.training_operator import (
    TrainingOperator,
    TrainingOperatorUnavailable,
    pytorch_job,
    pytorch_jobs_path,
    succeeded,
)

pytestmark = [pytest.mark.controlplane, pytest.mark.timeout(150)]

JOB_NAME_LABEL = "training.kubeflow.org/job-name"
ONE_GPU = {"requests": {"nvidia.com/gpu": "1"}, "limits": {"nvidia.com/gpu": "1"}}


@pytest.fixture(scope="module")
def peer(cluster: ControlPlane) -> Iterator[TrainingOperator]:
    operator = TrainingOperator(cluster)
    try:
        operator.start()
    except (TrainingOperatorUnavailable, FileNotFoundError) as error:
        pytest.fail(str(error), pytrace=False)
    try:
        yield operator
    finally:
        operator.stop()


def pods(cluster: ControlPlane, namespace: str, name: str) -> list[JSON]:
    return list(cluster.kube.get(namespaced("pods", namespace), labelSelector=f"{JOB_NAME_LABEL}={name}")["items"])


def test_the_peers_webhook_rejects_a_job_without_a_pytorch_container(
    cluster: ControlPlane, peer: TrainingOperator, namespace: str
) -> None:
    body = pytorch_job("no-pytorch", namespace, image=DEFAULT_TRAINER_IMAGE, resources=ONE_GPU)
    body["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["name"] = "trainer"
    with pytest.raises(ApiError) as rejected:
        cluster.kube.create(pytorch_jobs_path(namespace), body)
    message = str(rejected.value)
    assert "validator.pytorchjob.training-operator.kubeflow.org" in message and "name pytorch" in message, message


def test_a_one_node_pytorchjob_runs_to_succeeded_on_kwok(
    cluster: ControlPlane, peer: TrainingOperator, namespace: str
) -> None:
    cluster.kube.create(pytorch_jobs_path(namespace),
                        pytorch_job("peer", namespace, image=DEFAULT_TRAINER_IMAGE, resources=ONE_GPU))  # fmt: skip
    # kwok plays the pod Running once the scheduler puts it on a fake GPU node.
    wait_until(lambda: [p["status"].get("phase") for p in pods(cluster, namespace, "peer")] == ["Running"],
               timeout=60, what="the Master pod Running on kwok", on_tick=peer.check_alive)  # fmt: skip
    (pod,) = pods(cluster, namespace, "peer")
    now = pod_status.now()
    finished = pod_status.terminated(pod, pod_status.Terminated(0, "", now, now, "kiln://test"), restarts=0)
    cluster.kube.patch(namespaced("pods", namespace, pod["metadata"]["name"]) + "/status", finished)
    wait_until(lambda: succeeded(cluster.kube.get(pytorch_jobs_path(namespace, "peer"))), timeout=60,
               what="PyTorchJob Succeeded", on_tick=peer.check_alive)  # fmt: skip
