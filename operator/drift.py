"""Drift repair: recreate a live TrainingJob's ConfigMap or Service as soon as someone deletes it.

A reconcile creates them only with a new attempt's Job; without this, an attempt whose Service was deleted
would lose its rendezvous DNS names, and a restarted pod whose ConfigMap was deleted could not mount its spec,
until the next attempt. The handlers call ``repair_children`` on a child's DELETED event.
"""

from __future__ import annotations

from typing import Any

from kiln.api.status import TERMINAL_PHASES
from kiln.operator.kube import Kube
from kiln.operator.reconcile import load_status, resolve_body
from kiln.operator.render import needs_service, render_configmap, render_service
from kiln.operator.settings import Settings

Obj = dict[str, Any]


def needs_children(body: Obj) -> bool:
    """Whether the TrainingJob has an attempt in flight (its pods mount the ConfigMap and use the Service)."""
    status = load_status(body.get("status"))
    return status.attempt >= 1 and status.phase not in TERMINAL_PHASES


def repair_children(kube: Kube, settings: Settings, body: Obj) -> list[str]:
    """Create whichever of the ConfigMap and Service is missing; the kinds created, for the log.

    Create-or-adopt, never patch: an existing ConfigMap keeps the spec its attempt started with, and a recreated
    one holds the current spec, as the next attempt's would (the running pods read theirs at start already).
    """
    if body["metadata"].get("deletionTimestamp") or not needs_children(body):
        return []
    resolved, _ = resolve_body(body, settings)
    if resolved is None:
        return []
    created = []
    children = [render_configmap(resolved), *([render_service(resolved)] if needs_service(resolved) else [])]
    for child in children:
        meta = child["metadata"]
        if kube.get(child["apiVersion"], child["kind"], meta["namespace"], meta["name"]) is None:
            kube.create_or_adopt(child)
            created.append(child["kind"])
    return created
