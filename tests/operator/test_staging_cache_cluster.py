"""A staging cache claim on the real path: operator, control plane, local executor, real torchrun, moto S3.

The TrainingJob names a PersistentVolumeClaim as its staging cache (data.staging.cacheClaim), bound to a
PersistentVolume as a cluster admin would make it; the executor gives a claim one directory shared by every pod
it runs, as a node-local or ReadWriteMany volume would be. One worker pod is evicted mid-run, so the operator
starts a second attempt (a whole new gang of pods). S3 sits behind a counting proxy: across both attempts and both
pods of each, every dataset object is fetched exactly once. With the default emptyDir, each pod of each attempt
fetches the whole dataset (four times here).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from operator_process import OperatorProcess
from test_end_to_end import create_secret, manifest, upload_digits
from test_faults_cluster import NODES, Witness, attempt_pods, checkpointed_mid_run

from kiln.testing.controlplane import ControlPlane
from kiln.testing.faulty_proxy import FaultyProxy
from kiln.testing.kube import namespaced
from kiln.testing.processes import wait_until
from kiln.testing.s3 import S3Server

pytestmark = [pytest.mark.controlplane, pytest.mark.slow, pytest.mark.timeout(600)]

CLAIM = "staging-cache"
STORAGE_CLASS = "kiln-test-staging"


def create_bound_claim(cluster: ControlPlane, namespace: str) -> None:
    """A PersistentVolume pre-bound to a ReadWriteMany claim in ``namespace``, as a cluster admin provisions one;
    the PV controller binds the two, and the scheduler places pods that use the claim only once it is Bound."""
    volume = f"{namespace}-staging"
    claim_spec: dict[str, Any] = {
        "accessModes": ["ReadWriteMany"],
        "storageClassName": STORAGE_CLASS,
        "resources": {"requests": {"storage": "1Gi"}},
        "volumeName": volume,
    }
    cluster.kube.create(
        "/api/v1/persistentvolumes",
        {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": volume},
            "spec": {
                "capacity": {"storage": "1Gi"},
                "accessModes": ["ReadWriteMany"],
                "storageClassName": STORAGE_CLASS,
                "persistentVolumeReclaimPolicy": "Retain",  # the test deletes it
                # The executor gives the claim a directory of its own; a real cluster's PV would be NFS, CephFS...
                "nfs": {"server": "nfs.example", "path": f"/exports/{volume}"},
                "claimRef": {"namespace": namespace, "name": CLAIM},
            },
        },
    )
    cluster.kube.create(
        namespaced("persistentvolumeclaims", namespace),
        {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": CLAIM}, "spec": claim_spec},
    )

    def bound() -> bool:
        claim = cluster.kube.get(namespaced("persistentvolumeclaims", namespace, CLAIM))
        return bool(claim.get("status", {}).get("phase") == "Bound")

    wait_until(bound, timeout=60, what=f"claim {namespace}/{CLAIM} Bound")


def dataset_gets(proxy: FaultyProxy, bucket: str) -> dict[str, int]:
    """How often each dataset object was fetched through the proxy."""
    counts: dict[str, int] = {}
    for method, path, status in proxy.requests:
        if method == "GET" and path.startswith(f"/{bucket}/digits/") and status == 200:
            counts[path] = counts.get(path, 0) + 1
    return counts


def test_a_gang_restart_reuses_the_data_staged_in_the_cache_claim(
    cluster: ControlPlane,
    kiln_operator: OperatorProcess,
    namespace: str,
    s3_server: S3Server,
    s3_bucket: str,
    tmp_path: Path,
) -> None:
    name, epochs = "cached", 3
    create_bound_claim(cluster, namespace)
    try:
        run_and_evict_then_check_the_fetches(
            cluster, kiln_operator, namespace, s3_server, s3_bucket, tmp_path, name, epochs
        )
    finally:
        cluster.kube.delete(f"/api/v1/persistentvolumes/{namespace}-staging")


def run_and_evict_then_check_the_fetches(
    cluster: ControlPlane, kiln_operator: OperatorProcess, namespace: str, s3_server: S3Server, s3_bucket: str,
    tmp_path: Path, name: str, epochs: int,
) -> None:  # fmt: skip
    images = upload_digits(s3_server, s3_bucket, tmp_path)
    create_secret(cluster, namespace, s3_server)
    with FaultyProxy(s3_server.endpoint_url, []) as proxy:
        document = manifest(namespace, s3_bucket, s3_server, name=name)
        document["spec"]["epochs"] = epochs
        document["spec"]["storage"]["endpointUrl"] = proxy.endpoint_url
        document["spec"]["data"]["staging"] = {"cacheClaim": CLAIM}
        document["spec"]["runPolicy"] = {"maxRestarts": 2, "terminationGracePeriodSeconds": 10}
        cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(document))
        witness = Witness(cluster, kiln_operator, namespace, name)
        witness.until(checkpointed_mid_run, timeout=180, what="attempt 1 running with a checkpoint")
        first_attempt = dict(dataset_gets(proxy, s3_bucket))

        pods = attempt_pods(cluster, namespace, 1)
        assert all(
            volume == {"name": "cache", "persistentVolumeClaim": {"claimName": CLAIM}}
            for pod in pods
            for volume in pod["spec"]["volumes"]
            if volume["name"] == "cache"
        ), pods
        victim = pods[1]["metadata"]["name"]
        eviction = {"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": victim, "namespace": namespace}}
        cluster.kube.create(namespaced("pods", namespace, victim) + "/eviction", eviction)
        status = witness.until(lambda s: s.get("phase") == "Succeeded", timeout=300, what="success after the restart")
        fetched = dataset_gets(proxy, s3_bucket)

    witness.assert_one_restart_told_truthfully()
    assert status["attempt"] == 2 and status["workers"]["succeeded"] == NODES, status
    # Attempt 1's two pods staged the dataset once between them (one waited on the cache folder's lock) ...
    assert len(first_attempt) == images and set(first_attempt.values()) == {1}, first_attempt
    # ... and attempt 2's new pods fetched nothing: the claim outlived attempt 1's pods.
    assert fetched == first_attempt, {key: n for key, n in fetched.items() if n > 1}
    rank0 = attempt_pods(cluster, namespace, 2)[0]["metadata"]["name"]
    log = cluster.pod_log_path(namespace, rank0).read_text(errors="replace")
    assert f"s3://{s3_bucket}/digits/train: already staged in" in log, log[-3000:]
