"""One reconcile pass: observe the TrainingJob and its current attempt, decide (pure), act, write status.

Idempotent by construction: child names are deterministic per attempt, creates adopt on 409, the decision
is recomputed from what is observed, and only changed status keys are patched.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from kiln.api.manifest import InvalidManifest
from kiln.api.resolve import ResolvedTrainingJob, parse_and_resolve
from kiln.api.status import TERMINAL_PHASES, TrainingJobStatus
from kiln.api.training import RunPolicy
from kiln.operator import labels as L
from kiln.operator.changes import AppliedSpec, applied_spec
from kiln.operator.conditions import status_patch
from kiln.operator.failures import classify, rank0_report
from kiln.operator.kube import Kube
from kiln.operator.kueue import workload_verdict
from kiln.operator.pending import blocked
from kiln.operator.render import needs_service, render_configmap, render_job, render_service
from kiln.operator.settings import Settings
from kiln.operator.status import Decision, Observed, job_deadline, job_view, next_status

Obj = dict[str, Any]
_STATUS_KEYS = set(TrainingJobStatus.model_fields) | {f.alias for f in TrainingJobStatus.model_fields.values()}


class Stale(Exception):
    """A decision from a watched body (which may trail the apiserver) would act on a Job: read, then decide again."""


@dataclass(frozen=True)
class StatusWrite:
    """A decided status patch, written over ``resource_version`` when that is set (409 if anything wrote since)."""

    namespace: str
    name: str
    patch: Obj
    resource_version: str | None

    def __call__(self, kube: Kube) -> None:
        kube.patch_trainingjob_status(self.namespace, self.name, self.patch, resource_version=self.resource_version)


@dataclass(frozen=True)
class Outcome:
    decision: Decision
    before: TrainingJobStatus
    patched: bool
    deferred: StatusWrite | None = None
    """The status write left to the caller (``reconcile(defer_status=True)``); None once written, or if none."""


def load_status(raw: Obj | None) -> TrainingJobStatus:
    """The stored status, ignoring keys this version does not know (another writer's, an older schema's)."""
    known = {k: v for k, v in (raw or {}).items() if k in _STATUS_KEYS}
    try:
        return TrainingJobStatus.model_validate(known)
    except ValueError:
        return TrainingJobStatus()


def resolve_body(body: Obj, settings: Settings) -> tuple[ResolvedTrainingJob | None, str | None]:
    """Validate with the same kiln.api models as `kiln validate`; (resolved, None) or (None, errors)."""
    document = {key: body.get(key) for key in ("apiVersion", "kind", "metadata", "spec")}
    document["metadata"] = {k: v for k, v in (body.get("metadata") or {}).items() if k != "managedFields"}
    try:
        return parse_and_resolve(document, settings.environment()), None
    except InvalidManifest as exc:
        return None, "; ".join(map(str, exc.errors))


def observe(
    kube: Kube,
    body: Obj,
    resolved: ResolvedTrainingJob | None,
    invalid: str | None,
    job_body: Obj | None = None,
    *,
    check_pods: bool = False,
) -> Observed:
    """What one decision reads. ``check_pods``: when the admitted attempt is not all running, read its pods for
    what blocks them (a resync asks: a stuck pod changes nothing on its Job, so no Job event would)."""
    meta, status = body["metadata"], load_status(body.get("status"))
    if resolved is None:
        return Observed(
            generation=meta.get("generation"),
            nodes=1,
            run_policy=RunPolicy(),
            status=status,
            invalid=invalid or "invalid spec",
        )
    namespace, name, attempt = resolved.namespace, resolved.name, status.attempt
    job_name = L.attempt_job_name(name, attempt)
    job = None
    if attempt:
        fresh = job_body is not None and job_body.get("metadata", {}).get("name") == job_name
        job = job_body if fresh else kube.get_job(namespace, job_name)
    view = job_view(job)
    failure, report, kueue = None, None, None
    if view.suspended and resolved.spec.run_policy.queue_name and job is not None:
        # Why Kueue holds the Job (not admitted yet, or evicted) is on its Workload, not on the Job.
        kueue = workload_verdict(kube.job_workload(namespace, job["metadata"]["uid"]))
    if view.finished and status.phase not in TERMINAL_PHASES:  # a finished job's last attempt was read already
        pods = kube.attempt_pods(namespace, name, attempt)
        report = rank0_report(pods)
        if view.failed_reason is not None:
            failure = classify(pods, job or {}, resolved.spec.run_policy.retriable_exit_codes)
    pods_checked = check_pods and view.exists and not view.suspended and not view.finished
    pods_checked = pods_checked and view.ready < resolved.spec.resources.nodes
    stuck = blocked(kube.attempt_pods(namespace, name, attempt)) if pods_checked else None
    return Observed(
        generation=meta.get("generation"),
        nodes=resolved.spec.resources.nodes,
        pods_checked=pods_checked,
        blocked=stuck,
        run_policy=resolved.spec.run_policy,
        status=status,
        job=view,
        failure=failure,
        report=report,
        kueue=kueue,
        wanted=applied_spec(body.get("spec") or {}, meta.get("generation"), resolved.spec.epochs),
    )


def act(
    kube: Kube,
    settings: Settings,
    resolved: ResolvedTrainingJob | None,
    decision: Decision,
    now: datetime,
    *,
    applied: AppliedSpec | None = None,
) -> None:
    """Carry out a decision; ``applied`` (the current spec's digest) is recorded on a Job it creates."""
    if resolved is None:
        return
    namespace, name = resolved.namespace, resolved.name
    if decision.delete_attempt is not None:
        kube.delete_job(namespace, L.attempt_job_name(name, decision.delete_attempt))
    if decision.create_attempt is not None:
        # Independent creates, sent together: the Job's pods wait for the ConfigMap volume as kubelet
        # retries mounts, and the Service only gives the pods DNS names, which they resolve later.
        configmap = render_configmap(resolved)
        deadline = job_deadline(resolved.spec.run_policy, decision.status.start_time, None, now)
        job = render_job(resolved, decision.create_attempt, settings, active_deadline_seconds=deadline, applied=applied)
        creates = [lambda: kube.apply_configmap(configmap), lambda: kube.create_or_adopt(job)]
        if needs_service(resolved):
            service = render_service(resolved)
            creates.append(lambda: kube.create_or_adopt(service))
        kube.concurrently(*creates)
    if decision.job_deadline is not None or decision.clear_job_deadline:
        job_name = L.attempt_job_name(name, decision.status.attempt)
        # A merge patch: when clearing, job_deadline is None, and null removes the field.
        kube.patch_job(namespace, job_name, {"spec": {"activeDeadlineSeconds": decision.job_deadline}})
    for attempt in decision.cleanup_attempts:
        kube.delete_job(namespace, L.attempt_job_name(name, attempt))


def reconcile(
    kube: Kube,
    settings: Settings,
    body: Obj,
    *,
    job_body: Obj | None = None,
    now: datetime | None = None,
    unread: bool = False,
    watched: bool = False,
    check_pods: bool = False,
    defer_status: bool = False,
    held: Obj | None = None,
) -> Outcome:
    """Observe -> decide -> act -> patch status. Safe to repeat at any point.

    ``unread``: ``body`` came from a watch event, not a fresh read, so the status is written only over that very
    version (an ApiException 409 when anything wrote the TrainingJob since; the caller reads it and goes again).
    ``watched``: as ``unread``, and the body is the watch's latest, which may trail the apiserver (a status this
    operator wrote a moment ago): a decision that would act on a Job raises ``Stale`` instead, so that only a
    fresh read (or the very first event of a TrainingJob) ever creates or deletes a Job.
    ``check_pods``: see ``observe``.
    ``defer_status``: return the status patch as ``Outcome.deferred`` instead of sending it.
    ``held``: a status decided from this very version of ``body`` and not written yet (a deferred one): this pass
    decides from it as if it were written, and its patch carries both.
    """
    now = now or datetime.now(UTC)
    stored = body.get("status") or {}
    if held is not None:
        body = {**body, "status": held}
    resolved, invalid = resolve_body(body, settings)
    observed = observe(kube, body, resolved, invalid, job_body, check_pods=check_pods)
    decision = next_status(observed, now)
    if watched and decision.acts:
        raise Stale
    act(kube, settings, resolved, decision, now, applied=observed.wanted)
    patch = status_patch(stored, decision.status)
    if not patch:
        return Outcome(decision=decision, before=observed.status, patched=False)
    meta = body["metadata"]
    write = StatusWrite(
        meta["namespace"], meta["name"], patch, meta.get("resourceVersion") if unread or watched else None
    )
    if defer_status:
        return Outcome(decision=decision, before=observed.status, patched=False, deferred=write)
    write(kube)
    return Outcome(decision=decision, before=observed.status, patched=True)
