"""Pure renderers: a ResolvedTrainingJob in, plain Kubernetes dicts out.

No API client, clock, uuid or environment reads: anything that varies (the attempt number, the remaining
deadline) is an argument, so the same inputs always give the same objects and tests can assert on them.
"""

from __future__ import annotations

from typing import Any

from kiln.api import contract
from kiln.api.base import API_VERSION
from kiln.api.contract import Env
from kiln.api.resolve import ResolvedTrainingJob
from kiln.operator import labels as L
from kiln.operator.changes import AppliedSpec
from kiln.operator.settings import Settings

Obj = dict[str, Any]


def owner_reference(resolved: ResolvedTrainingJob) -> list[Obj]:
    """The TrainingJob as controller of its children, so deleting it garbage-collects them."""
    if not resolved.uid:
        return []
    return [
        {
            "apiVersion": API_VERSION,
            "kind": L.TJ_KIND,
            "name": resolved.name,
            "uid": resolved.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]


def _metadata(resolved: ResolvedTrainingJob, name: str, component: str, **extra_labels: str) -> Obj:
    return {
        "name": name,
        "namespace": resolved.namespace,
        "labels": {**L.common_labels(resolved.name, component), **extra_labels},
        "ownerReferences": owner_reference(resolved),
    }


def render_configmap(resolved: ResolvedTrainingJob) -> Obj:
    """The resolved spec the trainer reads. It names the credentials Secret but never holds its values."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(resolved, L.configmap_name(resolved.name), "spec"),
        "data": {contract.SPEC_FILE: resolved.model_dump_json(by_alias=True)},
    }


def render_service(resolved: ResolvedTrainingJob) -> Obj:
    """Headless Service giving every worker pod a stable DNS name for the torchrun rendezvous."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(resolved, L.service_name(resolved.name), "rendezvous"),
        "spec": {
            "clusterIP": "None",
            # Rendezvous happens before any pod is Ready; DNS must resolve from the start.
            "publishNotReadyAddresses": True,
            "selector": {L.TRAINING_JOB: resolved.name},
            "ports": [{"name": "rendezvous", "port": contract.RENDEZVOUS_PORT, "targetPort": contract.RENDEZVOUS_PORT}],
        },
    }


def master_address(resolved: ResolvedTrainingJob, attempt: int) -> str:
    """Pod 0's DNS name: Indexed Job pods get hostname <job>-<index> under the Service's subdomain."""
    job = L.attempt_job_name(resolved.name, attempt)
    return f"{job}-0.{L.service_name(resolved.name)}.{resolved.namespace}.svc"


def _env(resolved: ResolvedTrainingJob, attempt: int) -> list[Obj]:
    resources = resolved.spec.resources
    storage = resolved.spec.storage
    env: list[Obj] = [
        {"name": "PET_NNODES", "value": str(resources.nodes)},
        {"name": "PET_NPROC_PER_NODE", "value": str(resolved.procs_per_node)},
        {
            "name": "PET_NODE_RANK",
            "valueFrom": {"fieldRef": {"fieldPath": f"metadata.annotations['{L.COMPLETION_INDEX_ANNOTATION}']"}},
        },
        {"name": "PET_MASTER_ADDR", "value": master_address(resolved, attempt)},
        {"name": "PET_MASTER_PORT", "value": str(contract.RENDEZVOUS_PORT)},
        {"name": Env.METRICS_PORT, "value": str(contract.METRICS_PORT)},
        {"name": Env.TERMINATION_LOG, "value": contract.TERMINATION_LOG},
        {"name": Env.CACHE_DIR, "value": contract.CACHE_DIR},
        {"name": Env.ATTEMPT, "value": str(attempt)},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    if storage.endpoint_url:
        env.append({"name": "AWS_ENDPOINT_URL", "value": storage.endpoint_url})
    if storage.region:
        env.append({"name": "AWS_DEFAULT_REGION", "value": storage.region})
    return env


def _resources(resolved: ResolvedTrainingJob) -> Obj:
    spec = resolved.spec.resources
    amounts: dict[str, str] = {}
    if spec.gpus_per_node:
        amounts["nvidia.com/gpu"] = str(spec.gpus_per_node)
    if spec.cpu is not None:
        amounts["cpu"] = str(spec.cpu)
    if spec.memory is not None:
        amounts["memory"] = str(spec.memory)
    # Requests equal limits: Guaranteed QoS, so a training pod is the last to be evicted under pressure.
    return {"requests": dict(amounts), "limits": dict(amounts)} if amounts else {}


def torchrun_args(resolved: ResolvedTrainingJob) -> list[str]:
    resources = resolved.spec.resources
    return [
        "--nnodes", str(resources.nodes),
        "--nproc-per-node", str(resolved.procs_per_node),
        "--node-rank", "$(PET_NODE_RANK)",
        "--master-addr", "$(PET_MASTER_ADDR)",
        "--master-port", str(contract.RENDEZVOUS_PORT),
        "-m", "kiln.trainer",
        "--spec", f"{contract.SPEC_DIR}/{contract.SPEC_FILE}",
    ]  # fmt: skip


def _container(resolved: ResolvedTrainingJob, attempt: int) -> Obj:
    container: Obj = {
        "name": contract.CONTAINER_NAME,
        "image": resolved.image,
        "command": ["torchrun"],
        "args": torchrun_args(resolved),
        "env": _env(resolved, attempt),
        "ports": [
            {"name": "metrics", "containerPort": contract.METRICS_PORT, "protocol": "TCP"},
            {"name": "rendezvous", "containerPort": contract.RENDEZVOUS_PORT, "protocol": "TCP"},
        ],
        "resources": _resources(resolved),
        "volumeMounts": [
            {"name": "spec", "mountPath": contract.SPEC_DIR, "readOnly": True},
            {"name": "dshm", "mountPath": "/dev/shm"},
            {"name": "cache", "mountPath": contract.CACHE_DIR},
        ],
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "runAsNonRoot": True,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "terminationMessagePath": contract.TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if resolved.spec.storage.secret_ref:
        container["envFrom"] = [{"secretRef": {"name": resolved.spec.storage.secret_ref}}]
    return container


def _pod_spec(resolved: ResolvedTrainingJob, attempt: int, settings: Settings) -> Obj:
    spec = resolved.spec
    pod: Obj = {
        "restartPolicy": "Never",
        "subdomain": L.service_name(resolved.name),
        "terminationGracePeriodSeconds": spec.run_policy.termination_grace_period_seconds,
        # The trainer needs no Kubernetes API access at all: progress is pulled, not pushed.
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": settings.run_as_user,
            "runAsGroup": settings.run_as_user,
            "fsGroup": settings.run_as_user,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [_container(resolved, attempt)],
        "volumes": [
            {"name": "spec", "configMap": {"name": L.configmap_name(resolved.name)}},
            {"name": "dshm", "emptyDir": {"medium": "Memory"}},
            {"name": "cache", "emptyDir": {}},
        ],
    }
    if spec.resources.node_selector:
        pod["nodeSelector"] = dict(spec.resources.node_selector)
    if spec.resources.tolerations:
        pod["tolerations"] = [t.to_dict() for t in spec.resources.tolerations]
    if spec.resources.affinity:
        pod["affinity"] = dict(spec.resources.affinity)
    if spec.run_policy.priority_class_name:
        pod["priorityClassName"] = spec.run_policy.priority_class_name
    return pod


# backoffLimit 0 plus FailJob on any non-zero exit or disruption: the Job never retries a single pod
# (a lone replacement cannot rejoin a DDP gang); the operator decides whether to restart the whole gang.
POD_FAILURE_POLICY: Obj = {
    "rules": [
        {"action": "FailJob", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        {"action": "FailJob", "onExitCodes": {"operator": "NotIn", "values": [0]}},
    ]
}


def render_job(
    resolved: ResolvedTrainingJob,
    attempt: int,
    settings: Settings,
    *,
    active_deadline_seconds: int | None = None,
    applied: AppliedSpec | None = None,
) -> Obj:
    """The Indexed Job of one attempt: one pod per node, node rank = completion index.

    ``active_deadline_seconds`` is what is left of runPolicy.activeDeadlineSeconds for this attempt.
    ``applied`` is the TrainingJob spec the attempt runs, recorded as annotations so that later reconciles
    can tell which edits it does not have yet.
    """
    run_policy = resolved.spec.run_policy
    nodes = resolved.spec.resources.nodes
    extra = {L.ATTEMPT: str(attempt)}
    if run_policy.queue_name:
        extra[L.KUEUE_QUEUE_NAME] = run_policy.queue_name
    metadata = _metadata(resolved, L.attempt_job_name(resolved.name, attempt), "worker", **extra)
    if applied is not None:
        metadata["annotations"] = applied.annotations()
    job_spec: Obj = {
        "completionMode": "Indexed",
        "completions": nodes,
        "parallelism": nodes,
        "backoffLimit": 0,
        "podFailurePolicy": POD_FAILURE_POLICY,
        # Kueue admits a queued Job by flipping this; the operator never touches it afterwards.
        "suspend": bool(run_policy.queue_name),
        "template": {
            "metadata": {"labels": {**L.common_labels(resolved.name, "worker"), L.ATTEMPT: str(attempt)}},
            "spec": _pod_spec(resolved, attempt, settings),
        },
    }
    if active_deadline_seconds is not None:
        job_spec["activeDeadlineSeconds"] = max(1, int(active_deadline_seconds))
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": metadata, "spec": job_spec}
