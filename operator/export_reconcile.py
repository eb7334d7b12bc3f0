"""One ExportJob reconcile pass: observe the ExportJob, its source TrainingJob and its Job, decide (pure), act,
write status.

Idempotent like the TrainingJob's: the children's names are deterministic, creates adopt on 409, the decision
is recomputed from what is observed, and only changed status keys are patched.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from kiln.api.contract import EXPORTER_CONTAINER_NAME, parse_export_report
from kiln.api.manifest import ExportJob, InvalidManifest, ManifestError
from kiln.api.parse import parse_manifest
from kiln.api.status import ConditionType, ExportJobStatus
from kiln.operator import labels as L
from kiln.operator.conditions import parse_time, status_patch
from kiln.operator.export_render import render_export_configmap, render_export_job
from kiln.operator.export_status import ExportDecision, ExportObserved, SourceView, next_export_status, source_view
from kiln.operator.failures import PodOutcome, pod_outcome
from kiln.operator.kube import Kube
from kiln.operator.pending import blocked
from kiln.operator.reconcile import resolve_body
from kiln.operator.settings import Settings
from kiln.operator.status import job_view

Obj = dict[str, Any]
_STATUS_KEYS = set(ExportJobStatus.model_fields) | {f.alias for f in ExportJobStatus.model_fields.values()}


@dataclass(frozen=True)
class ExportOutcome:
    decision: ExportDecision
    patched: bool


def load_export_status(raw: Obj | None) -> ExportJobStatus:
    """The stored status, ignoring keys this version does not know."""
    known = {k: v for k, v in (raw or {}).items() if k in _STATUS_KEYS}
    try:
        return ExportJobStatus.model_validate(known)
    except ValueError:
        return ExportJobStatus()


def parse_exportjob(body: Obj) -> tuple[ExportJob | None, str | None]:
    """Validate with the same kiln.api models as `kiln validate`; (manifest, None) or (None, errors)."""
    document = {key: body.get(key) for key in ("apiVersion", "kind", "metadata", "spec")}
    document["metadata"] = {k: v for k, v in (body.get("metadata") or {}).items() if k != "managedFields"}
    try:
        manifest = parse_manifest(document)
    except InvalidManifest as exc:
        return None, "; ".join(map(str, exc.errors))
    if not isinstance(manifest, ExportJob):
        return None, str(ManifestError("", "kind", f"expected an ExportJob, got {manifest.kind}"))
    return manifest, None


def read_source(kube: Kube, settings: Settings, namespace: str, name: str) -> SourceView:
    """The source TrainingJob, with its output root resolved as the operator resolves it for the trainer."""
    body = kube.get_trainingjob(namespace, name)
    resolved = resolve_body(body, settings)[0] if body is not None else None
    return source_view(name, body, resolved.run_uri if resolved is not None else None)


def last_pod(pods: list[Obj]) -> PodOutcome | None:
    """The exporter pod that ended last (the Job may have replaced earlier ones)."""
    ended = [(pod_outcome(p, EXPORTER_CONTAINER_NAME), p) for p in pods]
    ended = [(o, p) for o, p in ended if o.exit_code is not None or o.disrupted]
    if not ended:
        return None
    return max(ended, key=lambda op: (op[0].finished_at, op[1]["metadata"].get("creationTimestamp") or ""))[0]


def observe_export(kube: Kube, settings: Settings, body: Obj, *, check_pods: bool = False) -> ExportObserved:
    """What one decision reads. ``check_pods``: when the Job runs no ready pod, read why (a resync asks)."""
    meta, status = body["metadata"], load_export_status(body.get("status"))
    namespace, name = meta["namespace"], meta["name"]
    manifest, invalid = parse_exportjob(body)
    common: Obj = {
        "name": name,
        "namespace": namespace,
        "uid": meta.get("uid"),
        "generation": meta.get("generation"),
        "status": status,
        "created_at": parse_time(meta.get("creationTimestamp")),
        "retries": settings.export_retries,
        "source_grace_s": settings.source_grace_s,
    }
    if manifest is None:
        return ExportObserved(spec=None, invalid=invalid, **common)
    spec, started = manifest.spec, any(c.type == ConditionType.CREATED for c in status.conditions)
    job = job_view(kube.get_job(namespace, L.export_child_name(name)) if started else None)
    source = None
    if spec.source.training_job and not job.exists:  # before the start, or to create a deleted Job again
        source = read_source(kube, settings, namespace, spec.source.training_job)
    pod, report, stuck = None, None, None
    if job.finished:
        pod = last_pod(kube.export_pods(namespace, name))
        report = parse_export_report(pod.message) if pod is not None else None
    pods_checked = check_pods and job.exists and not job.finished and not job.ready
    if pods_checked:
        stuck = blocked(kube.export_pods(namespace, name))
    return ExportObserved(spec=spec, source=source, job=job, pod=pod, report=report, pods_checked=pods_checked,
                          blocked=stuck, **common)  # fmt: skip


def act_export(kube: Kube, settings: Settings, decision: ExportDecision) -> None:
    if decision.create is None:
        return
    # Sent together: the pod waits for its ConfigMap volume as the kubelet retries the mount.
    configmap, job = render_export_configmap(decision.create), render_export_job(decision.create, settings)
    kube.concurrently(lambda: kube.apply_configmap(configmap), lambda: kube.create_or_adopt(job))


def reconcile_export(
    kube: Kube, settings: Settings, body: Obj, *, now: datetime | None = None, check_pods: bool = False
) -> ExportOutcome:
    """Observe -> decide -> act -> patch status. Safe to repeat at any point."""
    observed = observe_export(kube, settings, body, check_pods=check_pods)
    decision = next_export_status(observed, now or datetime.now(UTC))
    act_export(kube, settings, decision)
    patch = status_patch(body.get("status") or {}, decision.status)
    if patch:
        kube.patch_exportjob_status(observed.namespace, observed.name, patch)
    return ExportOutcome(decision=decision, patched=bool(patch))


def waits_for(body: Obj, trainingjob: str) -> bool:
    """Whether an ExportJob (its latest body) has not started yet and exports ``trainingjob``'s checkpoint."""
    source = (body.get("spec") or {}).get("source") or {}
    started = any(c.get("type") == "Created" for c in (body.get("status") or {}).get("conditions") or [])
    return source.get("trainingJob") == trainingjob and not started
