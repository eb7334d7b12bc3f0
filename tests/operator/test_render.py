"""Structural checks of the rendered children, with expectations written out independently."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest
from tj_builders import SETTINGS, body, resolved_from

from kiln.api.contract import METRICS_PORT_NAME_PATTERN
from kiln.api.manifest import InvalidManifest
from kiln.operator.render import needs_service, render_configmap, render_job, render_service
from kiln.operator.settings import Settings

OWNER = {
    "apiVersion": "kiln.dev/v1alpha1",
    "kind": "TrainingJob",
    "name": "demo",
    "uid": "uid-1",
    "controller": True,
    "blockOwnerDeletion": True,
}


def _env(container: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_every_child_is_owned_and_labelled() -> None:
    resolved = resolved_from(body())
    for child in (render_configmap(resolved), render_service(resolved), render_job(resolved, 1, SETTINGS)):
        meta = child["metadata"]
        assert meta["ownerReferences"] == [OWNER]
        assert meta["namespace"] == "ml"
        assert meta["labels"]["kiln.dev/training-job"] == "demo"
        assert meta["labels"]["app.kubernetes.io/instance"] == "demo"
        assert meta["labels"]["app.kubernetes.io/managed-by"] == "kiln-operator"


def test_configmap_holds_the_resolved_spec_and_no_secret_values() -> None:
    resolved = resolved_from(body(storage={"secretRef": "s3-creds"}))
    cm = render_configmap(resolved)
    assert cm["metadata"]["name"] == "demo-spec"
    spec = json.loads(cm["data"]["trainingjob.json"])
    assert spec["name"] == "demo" and spec["worldSize"] == 8
    assert spec["spec"]["storage"]["secretRef"] == "s3-creds"
    assert "AWS_SECRET_ACCESS_KEY" not in cm["data"]["trainingjob.json"]


def test_service_is_headless_and_publishes_unready_pods() -> None:
    svc = render_service(resolved_from(body()))
    assert svc["metadata"]["name"] == "demo-workers"
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["publishNotReadyAddresses"] is True
    assert svc["spec"]["selector"] == {"kiln.dev/training-job": "demo"}


def test_job_is_an_indexed_gang_that_never_retries_a_single_pod() -> None:
    job = render_job(resolved_from(body()), 3, SETTINGS)
    spec = job["spec"]
    assert job["metadata"]["name"] == "demo-3"
    assert job["metadata"]["labels"]["kiln.dev/attempt"] == "3"
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 2, 2)
    assert spec["backoffLimit"] == 0 and spec["suspend"] is False
    actions = {rule["action"] for rule in spec["podFailurePolicy"]["rules"]}
    assert actions == {"FailJob"}
    assert "activeDeadlineSeconds" not in spec
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert pod["subdomain"] == "demo-workers"
    assert spec["template"]["metadata"]["labels"]["kiln.dev/attempt"] == "3"


def test_container_runs_torchrun_with_the_contract_flags_and_env() -> None:
    job = render_job(resolved_from(body()), 1, SETTINGS)
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["torchrun"]
    args = container["args"]
    assert args[args.index("--nnodes") + 1] == "2"
    assert args[args.index("--nproc-per-node") + 1] == "4"
    assert args[args.index("--master-port") + 1] == "29500"
    assert args[-4:] == ["-m", "kiln.trainer", "--spec", "/etc/kiln/trainingjob.json"]
    env = _env(container)
    assert env["PET_NNODES"] == "2" and env["PET_NPROC_PER_NODE"] == "4" and env["PET_MASTER_PORT"] == "29500"
    assert env["PET_MASTER_ADDR"] == "demo-1-0.demo-workers.ml.svc"
    assert env["PET_NODE_RANK"] == {
        "fieldRef": {"fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}
    }
    assert env["KILN_METRICS_PORT"] == "9400"
    assert env["KILN_TERMINATION_LOG"] == "/dev/termination-log"
    assert "KILN_CACHE_DIR" in env
    # glibc keeps freed memory mapped (mmap above 32 MiB, trim above 1 GiB): docs/benchmarks.md, segmentation
    assert env["MALLOC_MMAP_THRESHOLD_"] == "33554432" and env["MALLOC_TRIM_THRESHOLD_"] == "1073741824"
    # nproc-per-node 4: every local rank serves its own /metrics, each port named for a PodMonitor to keep
    metrics = [port for port in container["ports"] if re.fullmatch(METRICS_PORT_NAME_PATTERN, port["name"])]
    assert metrics == [
        {"name": "metrics", "containerPort": 9400, "protocol": "TCP"},
        {"name": "metrics-1", "containerPort": 9401, "protocol": "TCP"},
        {"name": "metrics-2", "containerPort": 9402, "protocol": "TCP"},
        {"name": "metrics-3", "containerPort": 9403, "protocol": "TCP"},
    ]
    assert {"name": "rendezvous", "containerPort": 29500, "protocol": "TCP"} in container["ports"]


def test_one_node_needs_no_service_and_finds_its_master_at_its_own_ip() -> None:
    resolved = resolved_from(body(resources={"nodes": 1, "gpusPerNode": 4}))
    assert not needs_service(resolved) and needs_service(resolved_from(body()))
    pod = render_job(resolved, 1, SETTINGS)["spec"]["template"]["spec"]
    assert "subdomain" not in pod
    assert _env(pod["containers"][0])["PET_MASTER_ADDR"] == {"fieldRef": {"fieldPath": "status.podIP"}}


def test_resources_and_placement_come_from_the_spec() -> None:
    document = body(
        resources={
            "nodes": 1,
            "gpusPerNode": 2,
            "cpu": "4",
            "memory": "8Gi",
            "nodeSelector": {"gpu": "a100"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "affinity": {"nodeAffinity": {}},
        },
        runPolicy={"priorityClassName": "high", "terminationGracePeriodSeconds": 300},
    )
    pod = render_job(resolved_from(document), 1, SETTINGS)["spec"]["template"]["spec"]
    limits = pod["containers"][0]["resources"]["limits"]
    assert limits == {"nvidia.com/gpu": "2", "cpu": "4", "memory": "8Gi"}
    assert pod["containers"][0]["resources"]["requests"] == limits
    assert pod["nodeSelector"] == {"gpu": "a100"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["affinity"] == {"nodeAffinity": {}}
    assert pod["priorityClassName"] == "high"
    assert pod["terminationGracePeriodSeconds"] == 300


def test_pod_is_pss_restricted_and_needs_no_api_token() -> None:
    pod = render_job(resolved_from(body()), 1, SETTINGS)["spec"]["template"]["spec"]
    container = pod["containers"][0]
    security = container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["runAsNonRoot"] is True
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] > 0
    assert pod["automountServiceAccountToken"] is False
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"] == {"medium": "Memory"}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts["/dev/shm"] == "dshm" and mounts["/etc/kiln"] == "spec"


def test_credentials_only_through_env_from_the_secret() -> None:
    document = body(storage={"secretRef": "team-s3", "endpointUrl": "http://minio:9000"})
    container = render_job(resolved_from(document), 1, SETTINGS)["spec"]["template"]["spec"]["containers"][0]
    assert container["envFrom"] == [{"secretRef": {"name": "team-s3"}}]
    env = _env(container)
    assert env["AWS_ENDPOINT_URL"] == "http://minio:9000"
    assert not any(name.startswith("AWS_SECRET") or name == "AWS_ACCESS_KEY_ID" for name in env)


def test_mlflow_credentials_come_from_their_secret_as_env_and_never_into_the_configmap() -> None:
    tracking = {"mlflow": {"uri": "https://mlflow.example.com", "credentialsSecret": "team-mlflow"}}
    resolved = resolved_from(body(tracking=tracking))
    container = render_job(resolved, 1, SETTINGS)["spec"]["template"]["spec"]["containers"][0]
    env = _env(container)
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        assert env[key] == {"secretKeyRef": {"name": "team-mlflow", "key": key, "optional": True}}
    spec = json.loads(render_configmap(resolved)["data"]["trainingjob.json"])["spec"]
    assert spec["tracking"]["mlflow"] == {
        "uri": "https://mlflow.example.com", "experiment": "ml", "runName": "demo", "credentialsSecret": "team-mlflow"
    }  # fmt: skip
    plain = _env(render_job(resolved_from(body()), 1, SETTINGS)["spec"]["template"]["spec"]["containers"][0])
    assert not any(name.startswith("MLFLOW_") for name in plain)


def test_queue_name_labels_the_job_and_creates_it_suspended() -> None:
    job = render_job(resolved_from(body(runPolicy={"queueName": "gpu-queue"})), 1, SETTINGS)
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    assert job["spec"]["suspend"] is True


def test_deadline_is_passed_through_and_never_below_one_second() -> None:
    resolved = resolved_from(body())
    assert render_job(resolved, 1, SETTINGS, active_deadline_seconds=90)["spec"]["activeDeadlineSeconds"] == 90
    assert render_job(resolved, 1, SETTINGS, active_deadline_seconds=-5)["spec"]["activeDeadlineSeconds"] == 1


def test_rendering_is_deterministic() -> None:
    resolved = resolved_from(body())
    assert render_job(resolved, 2, SETTINGS) == render_job(resolved, 2, SETTINGS)
    assert render_configmap(resolved) == render_configmap(resolved)


def _cache(resolved_settings: Settings, **spec_overrides: object) -> tuple[dict, dict, dict]:
    """The cache volume, its mount and the trainer's KILN_CACHE_DIR of a job rendered under these settings."""
    resolved = resolved_from(body(**spec_overrides), resolved_settings)
    pod = render_job(resolved, 1, resolved_settings)["spec"]["template"]["spec"]
    container = pod["containers"][0]
    volume = next(v for v in pod["volumes"] if v["name"] == "cache")
    mount = next(m for m in container["volumeMounts"] if m["name"] == "cache")
    return volume, mount, _env(container)


def test_the_staging_cache_is_an_emptydir_unless_a_claim_is_named() -> None:
    volume, mount, env = _cache(SETTINGS)
    assert volume == {"name": "cache", "emptyDir": {}}
    assert env["KILN_CACHE_DIR"] == mount["mountPath"]


def test_the_operators_cache_claim_is_every_pods_staging_cache_and_the_spec_overrides_it() -> None:
    shared = replace(SETTINGS, staging_cache_claim="node-cache")
    volume, mount, env = _cache(shared)
    assert volume == {"name": "cache", "persistentVolumeClaim": {"claimName": "node-cache"}}
    assert env["KILN_CACHE_DIR"] == mount["mountPath"]  # the trainer stages where the claim is mounted

    volume, _, _ = _cache(shared, data__staging={"cacheClaim": "team-cache"})
    assert volume["persistentVolumeClaim"] == {"claimName": "team-cache"}
    volume, _, _ = _cache(SETTINGS, data__staging={"cacheClaim": "team-cache"})
    assert volume["persistentVolumeClaim"] == {"claimName": "team-cache"}
    # A spec cacheDir is a folder of the pod's own: the default claim would be mounted and never written.
    volume, _, _ = _cache(shared, data__staging={"cacheDir": "/scratch"})
    assert volume == {"name": "cache", "emptyDir": {}}


def test_a_claim_and_a_cache_dir_are_refused_together() -> None:
    with pytest.raises(
        InvalidManifest, match=r"spec\.data\.staging\.cacheClaim: cacheClaim and cacheDir are exclusive"
    ):
        resolved_from(body(data__staging={"cacheClaim": "c", "cacheDir": "/scratch"}))


def test_the_pod_keeps_a_cache_claim_from_being_chowned_on_every_start() -> None:
    pod = render_job(resolved_from(body()), 1, SETTINGS)["spec"]["template"]["spec"]
    assert pod["securityContext"]["fsGroupChangePolicy"] == "OnRootMismatch"
