"""Pure renderers for an ExportJob: a ResolvedExportJob in, its ConfigMap and batch/v1 Job out.

The pod shares the trainer pods' parts (``render``): the PSS restricted security contexts, the S3 settings as
environment with the credentials only from the Secret, requests equal to limits. It differs where the work does:
one container running ``python -m kiln.trainer.export``, CPU unless resources.gpus asks for GPUs, and retries
left to the Job (a lone exporter pod, unlike a DDP gang, can simply be replaced).
"""

from __future__ import annotations

from typing import Any

from kiln.api import contract
from kiln.api.contract import Env, is_retriable_exit
from kiln.api.export_resolve import ResolvedExportJob
from kiln.operator import labels as L
from kiln.operator.render import (
    container_security_context,
    controller_reference,
    placement,
    pod_security_context,
    resource_amounts,
    secret_env_from,
    storage_env,
)
from kiln.operator.settings import Settings

Obj = dict[str, Any]

EXPORTER_COMMAND = ["python", "-m", "kiln.trainer.export"]
GRACE_PERIOD_S = 30
"""The exporter holds no state worth saving on SIGTERM: a retry starts the export over."""

# The exit codes that end the Job at once: every code the TrainingJob's rule (kiln.api.contract.is_retriable_exit,
# with no retriableExitCodes) calls final, so 1 (failed), 2 (invalid input) and 3 (verification failed) never
# retry. Signals (128 + n: an OOM kill, SIGTERM) and disruptions count against backoffLimit instead.
FINAL_EXIT_CODES = [code for code in range(1, 256) if not is_retriable_exit(code, ())]


def _metadata(resolved: ResolvedExportJob, component: str) -> Obj:
    return {
        "name": L.export_child_name(resolved.name),
        "namespace": resolved.namespace,
        "labels": L.export_labels(resolved.name, component),
        "ownerReferences": controller_reference(L.EJ_KIND, resolved.name, resolved.uid),
    }


def render_export_configmap(resolved: ResolvedExportJob) -> Obj:
    """The ResolvedExportJob the exporter reads. It names the credentials Secret but never holds its values."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(resolved, "spec"),
        "data": {contract.EXPORT_SPEC_FILE: resolved.model_dump_json(by_alias=True)},
    }


def _container(resolved: ResolvedExportJob, settings: Settings) -> Obj:
    spec = resolved.spec
    container: Obj = {
        "name": contract.EXPORTER_CONTAINER_NAME,
        "image": spec.image or settings.image,
        "command": EXPORTER_COMMAND,
        "args": ["--spec", f"{contract.SPEC_DIR}/{contract.EXPORT_SPEC_FILE}"],
        "env": [
            {"name": Env.TERMINATION_LOG, "value": contract.TERMINATION_LOG},
            {"name": Env.CACHE_DIR, "value": contract.CACHE_DIR},
            {"name": "PYTHONUNBUFFERED", "value": "1"},
            *storage_env(spec.storage),
        ],
        "resources": resource_amounts(spec.resources.gpus, spec.resources.cpu, spec.resources.memory),
        "volumeMounts": [
            {"name": "spec", "mountPath": contract.SPEC_DIR, "readOnly": True},
            {"name": "cache", "mountPath": contract.CACHE_DIR},
            # Exporters and onnxruntime write temporary files; the image's own /tmp may be read-only.
            {"name": "tmp", "mountPath": "/tmp"},
        ],
        "securityContext": container_security_context(),
        # The ExportReport (JSON) on exit; a crash that wrote none leaves the log's tail instead.
        "terminationMessagePath": contract.TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if env_from := secret_env_from(spec.storage):
        container["envFrom"] = env_from
    return container


def render_export_job(resolved: ResolvedExportJob, settings: Settings) -> Obj:
    """One pod, retried by the Job itself for signals and disruptions (up to settings.export_retries)."""
    labels = L.export_labels(resolved.name, "exporter")
    pod: Obj = {
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": GRACE_PERIOD_S,
        # The exporter needs no Kubernetes API access: it reads its spec from the ConfigMap, reports by exiting.
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": pod_security_context(settings),
        "containers": [_container(resolved, settings)],
        "volumes": [
            {"name": "spec", "configMap": {"name": L.export_child_name(resolved.name)}},
            {"name": "cache", "emptyDir": {}},
            {"name": "tmp", "emptyDir": {}},
        ],
        **placement(resolved.spec.resources.node_selector, resolved.spec.resources.tolerations),
    }
    failure_policy = {
        "rules": [
            # First match wins: a disrupted pod is retried whatever its exit code, as for TrainingJobs.
            {"action": "Count", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
            {
                "action": "FailJob",
                "onExitCodes": {
                    "containerName": contract.EXPORTER_CONTAINER_NAME,
                    "operator": "In",
                    "values": FINAL_EXIT_CODES,
                },
            },
        ]
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _metadata(resolved, "exporter"),
        "spec": {
            "completions": 1,
            "parallelism": 1,
            "backoffLimit": settings.export_retries,
            "podFailurePolicy": failure_policy,
            "template": {"metadata": {"labels": labels}, "spec": pod},
        },
    }
