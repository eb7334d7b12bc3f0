"""Label, annotation and name conventions for everything the operator creates, in one place."""

from __future__ import annotations

from typing import Any

from kiln.api.base import GROUP, VERSION
from kiln.api.contract import Label

TJ_GROUP, TJ_VERSION, TJ_PLURAL, TJ_KIND = GROUP, VERSION, "trainingjobs", "TrainingJob"
EJ_PLURAL, EJ_KIND = "exportjobs", "ExportJob"

# Every child carries these.
NAME = "app.kubernetes.io/name"
INSTANCE = "app.kubernetes.io/instance"
COMPONENT = "app.kubernetes.io/component"
PART_OF = "app.kubernetes.io/part-of"
MANAGED_BY = "app.kubernetes.io/managed-by"
# The pod-selecting keys are shared with `kubectl kiln logs` (kiln.api.contract.Label).
TRAINING_JOB = Label.TRAINING_JOB
ATTEMPT = Label.ATTEMPT
EXPORT_JOB = "kiln.dev/export-job"
"""On an ExportJob's children instead of TRAINING_JOB, so the TrainingJob watches never see them."""

APP_NAME = "kiln-trainer"
EXPORTER_APP_NAME = "kiln-exporter"
MANAGER = "kiln-operator"

# Set by Kubernetes itself on Indexed Job pods.
COMPLETION_INDEX_ANNOTATION = Label.COMPLETION_INDEX
COMPLETION_INDEX_LABEL = Label.COMPLETION_INDEX

KUEUE_QUEUE_NAME = "kueue.x-k8s.io/queue-name"
KUEUE_API_VERSION = "kueue.x-k8s.io/v1beta2"
"""The Kueue API the operator reads Workloads from: v1beta2, the storage version of v0.17.0 (the tested one)."""
KUEUE_JOB_UID = "kueue.x-k8s.io/job-uid"
"""Set by Kueue on the Workload it makes for a Job: that Job's uid."""

LEADER_LEASE = "kiln-operator"
"""The coordination.k8s.io Lease the replicas elect their leader with, in the operator's own namespace."""

# File names, ports and env names shared with the trainer live in kiln.api.contract.


def common_labels(job_name: str, component: str) -> dict[str, str]:
    return {
        NAME: APP_NAME,
        INSTANCE: job_name,
        COMPONENT: component,
        PART_OF: "kiln",
        MANAGED_BY: MANAGER,
        TRAINING_JOB: job_name,
    }


def export_labels(export_name: str, component: str) -> dict[str, str]:
    return {
        NAME: EXPORTER_APP_NAME,
        INSTANCE: export_name,
        COMPONENT: component,
        PART_OF: "kiln",
        MANAGED_BY: MANAGER,
        EXPORT_JOB: export_name,
    }


def export_child_name(export_name: str) -> str:
    """The ConfigMap and the Job of an ExportJob. The suffix keeps them apart from a TrainingJob's children in
    the same namespace, whose names end in -spec, -workers or an attempt number."""
    return f"{export_name}-export"


def configmap_name(job_name: str) -> str:
    return f"{job_name}-spec"


def service_name(job_name: str) -> str:
    return f"{job_name}-workers"


def attempt_job_name(job_name: str, attempt: int) -> str:
    """Deterministic per attempt, so a restarted operator adopts instead of duplicating."""
    return f"{job_name}-{attempt}"


def attempt_selector(job_name: str, attempt: int) -> str:
    return f"{TRAINING_JOB}={job_name},{ATTEMPT}={attempt}"


def completion_index(pod: dict[str, Any]) -> int | None:
    """A pod's index in its Indexed Job (the annotation, else the label Kubernetes sets beside it); None for a pod
    of no index, such as an ExportJob's exporter."""
    meta = pod.get("metadata") or {}
    raw = (meta.get("annotations") or {}).get(COMPLETION_INDEX_ANNOTATION) or (meta.get("labels") or {}).get(
        COMPLETION_INDEX_LABEL
    )
    return int(raw) if raw is not None and str(raw).isdigit() else None
