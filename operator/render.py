"""Pure renderers: a ResolvedTrainingJob in, plain Kubernetes dicts out.

No API client, clock, uuid or environment reads: anything that varies (the attempt number, the remaining
deadline) is an argument, so the same inputs always give the same objects and tests can assert on them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from kiln.api import contract
from kiln.api.base import API_VERSION
from kiln.api.contract import Env
from kiln.api.resolve import ResolvedTrainingJob
from kiln.api.runtime import StorageSpec, Toleration
from kiln.api.tracking import MLFLOW_CREDENTIAL_KEYS, TrackingSpec
from kiln.operator import labels as L
from kiln.operator.changes import AppliedSpec
from kiln.operator.settings import Settings

Obj = dict[str, Any]


def controller_reference(kind: str, name: str, uid: str | None) -> list[Obj]:
    """A Kiln object as controller of its children, so deleting it garbage-collects them."""
    if not uid:
        return []
    return [{"apiVersion": API_VERSION, "kind": kind, "name": name, "uid": uid, "controller": True,
             "blockOwnerDeletion": True}]  # fmt: skip


def owner_reference(resolved: ResolvedTrainingJob) -> list[Obj]:
    """The TrainingJob as controller of its children."""
    return controller_reference(L.TJ_KIND, resolved.name, resolved.uid)


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


def needs_service(resolved: ResolvedTrainingJob) -> bool:
    """Whether the attempt's pods rendezvous across pods. One node's ranks all run in its one pod, which finds its
    master at its own IP: a Service there would cost five apiserver writes per job (itself, its Endpoints and
    EndpointSlice, and their updates as the pod starts) and serve no name anyone resolves."""
    return resolved.spec.resources.nodes > 1


def render_service(resolved: ResolvedTrainingJob) -> Obj:
    """Headless Service giving every worker pod a stable DNS name for the torchrun rendezvous (``needs_service``)."""
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


def master_address(resolved: ResolvedTrainingJob, attempt: int) -> Obj:
    """The PET_MASTER_ADDR variable: pod 0's DNS name (Indexed Job pods get hostname <job>-<index> under the
    Service's subdomain), or, for one node, the pod's own IP."""
    if not needs_service(resolved):
        return {"name": "PET_MASTER_ADDR", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}
    job = L.attempt_job_name(resolved.name, attempt)
    return {"name": "PET_MASTER_ADDR", "value": f"{job}-0.{L.service_name(resolved.name)}.{resolved.namespace}.svc"}


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
        master_address(resolved, attempt),
        {"name": "PET_MASTER_PORT", "value": str(contract.RENDEZVOUS_PORT)},
        {"name": Env.METRICS_PORT, "value": str(contract.METRICS_PORT)},
        {"name": Env.TERMINATION_LOG, "value": contract.TERMINATION_LOG},
        {"name": Env.CACHE_DIR, "value": contract.CACHE_DIR},
        {"name": Env.ATTEMPT, "value": str(attempt)},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        *({"name": name, "value": value} for name, value in contract.MALLOC_ENV.items()),
    ]
    return env + storage_env(storage) + tracking_env(resolved.spec.tracking)


def storage_env(storage: StorageSpec) -> list[Obj]:
    """The S3 connection settings that are not secret; the credentials come from the Secret (secret_env_from)."""
    env: list[Obj] = []
    if storage.endpoint_url:
        env.append({"name": "AWS_ENDPOINT_URL", "value": storage.endpoint_url})
    if storage.region:
        env.append({"name": "AWS_DEFAULT_REGION", "value": storage.region})
    return env


def tracking_env(tracking: TrackingSpec) -> list[Obj]:
    """MLflow's credentials: each key of tracking.mlflow.credentialsSecret as the variable of that name, read by
    the kubelet from the Secret. Every key is optional (a username and password, or a token)."""
    mlflow = tracking.mlflow
    if mlflow is None or not mlflow.credentials_secret:
        return []
    return [
        {"name": key, "valueFrom": {"secretKeyRef": {"name": mlflow.credentials_secret, "key": key, "optional": True}}}
        for key in MLFLOW_CREDENTIAL_KEYS
    ]


def secret_env_from(storage: StorageSpec) -> list[Obj]:
    """The credentials Secret as environment: its values never pass through the operator or a ConfigMap."""
    return [{"secretRef": {"name": storage.secret_ref}}] if storage.secret_ref else []


def resource_amounts(gpus: int, cpu: int | str | None, memory: int | str | None) -> Obj:
    amounts: dict[str, str] = {}
    if gpus:
        amounts["nvidia.com/gpu"] = str(gpus)
    if cpu is not None:
        amounts["cpu"] = str(cpu)
    if memory is not None:
        amounts["memory"] = str(memory)
    # Requests equal limits: Guaranteed QoS, so a training pod is the last to be evicted under pressure.
    return {"requests": dict(amounts), "limits": dict(amounts)} if amounts else {}


def _resources(resolved: ResolvedTrainingJob) -> Obj:
    spec = resolved.spec.resources
    return resource_amounts(spec.gpus_per_node, spec.cpu, spec.memory)


def placement(node_selector: Mapping[str, str] | None, tolerations: Sequence[Toleration] | None) -> Obj:
    """The pod spec keys that choose its nodes; none when the spec leaves them out."""
    keys: Obj = {}
    if node_selector:
        keys["nodeSelector"] = dict(node_selector)
    if tolerations:
        keys["tolerations"] = [t.to_dict() for t in tolerations]
    return keys


def container_security_context() -> Obj:
    """Pod Security Standards "restricted" for every container the operator renders (a fresh dict each time)."""
    return {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "runAsNonRoot": True,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def pod_security_context(settings: Settings) -> Obj:
    """Pod Security Standards "restricted" at pod level: a non-root UID (the trainer image's user)."""
    return {
        "runAsNonRoot": True,
        "runAsUser": settings.run_as_user,
        "runAsGroup": settings.run_as_user,
        "fsGroup": settings.run_as_user,
        # A staging cache claim holds whole datasets: the kubelet's default chowns every file on every mount.
        "fsGroupChangePolicy": "OnRootMismatch",
        "seccompProfile": {"type": "RuntimeDefault"},
    }


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


def metrics_ports(procs_per_node: int) -> list[Obj]:
    """Every local rank serves /metrics on METRICS_PORT + its local rank; each port is declared and named, so a
    PodMonitor scrapes one target per rank (kiln.api.contract.METRICS_PORT_NAME_PATTERN)."""
    return [
        {"name": contract.metrics_port_name(k), "containerPort": contract.METRICS_PORT + k, "protocol": "TCP"}
        for k in range(procs_per_node)
    ]


def _container(resolved: ResolvedTrainingJob, attempt: int) -> Obj:
    container: Obj = {
        "name": contract.CONTAINER_NAME,
        "image": resolved.image,
        "command": ["torchrun"],
        "args": torchrun_args(resolved),
        "env": _env(resolved, attempt),
        "ports": [
            *metrics_ports(resolved.procs_per_node),
            {"name": "rendezvous", "containerPort": contract.RENDEZVOUS_PORT, "protocol": "TCP"},
        ],
        "resources": _resources(resolved),
        "volumeMounts": [
            {"name": "spec", "mountPath": contract.SPEC_DIR, "readOnly": True},
            {"name": "dshm", "mountPath": "/dev/shm"},
            {"name": "cache", "mountPath": contract.CACHE_DIR},
        ],
        "securityContext": container_security_context(),
        "terminationMessagePath": contract.TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if env_from := secret_env_from(resolved.spec.storage):
        container["envFrom"] = env_from
    return container


def cache_volume(resolved: ResolvedTrainingJob) -> Obj:
    """The staging cache at contract.CACHE_DIR: data.staging.cacheClaim (resolved with the operator's default), which
    outlives the pods, so a restarted attempt finds its data staged; else an emptyDir, which dies with the pod."""
    claim = resolved.spec.data.staging.cache_claim
    if claim:
        return {"name": "cache", "persistentVolumeClaim": {"claimName": claim}}
    return {"name": "cache", "emptyDir": {}}


def _pod_spec(resolved: ResolvedTrainingJob, attempt: int, settings: Settings) -> Obj:
    spec = resolved.spec
    pod: Obj = {
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": spec.run_policy.termination_grace_period_seconds,
        # The trainer needs no Kubernetes API access at all: progress is pulled, not pushed.
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": pod_security_context(settings),
        "containers": [_container(resolved, attempt)],
        "volumes": [
            {"name": "spec", "configMap": {"name": L.configmap_name(resolved.name)}},
            {"name": "dshm", "emptyDir": {"medium": "Memory"}},
            cache_volume(resolved),
        ],
    }
    if needs_service(resolved):
        pod["subdomain"] = L.service_name(resolved.name)
    pod.update(placement(spec.resources.node_selector, spec.resources.tolerations))
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
