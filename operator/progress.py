"""Live progress: poll rank 0's ``GET /progress`` and copy it into TrainingJob.status; while the control
annotations ask for something, the poll is a ``POST /control`` carrying that request instead (same answer).

Pull, not push: the pods need no Kubernetes credentials (automountServiceAccountToken is off), a slow or
dead trainer only misses a poll, and the operator rate-limits its own status writes (one patch per poll
at most, none when nothing changed). The final numbers come from rank 0's termination message instead,
so nothing is lost when the last poll misses the end.
"""

from __future__ import annotations

import urllib.request
from typing import Any

from kiln.api import contract
from kiln.api.contract import ControlRequest, TrainerReport, parse_report
from kiln.api.status import CheckpointStatus, ControlStatus, Progress
from kiln.operator import labels as L
from kiln.operator.conditions import merge_model
from kiln.operator.control import control_request
from kiln.operator.kube import Kube
from kiln.operator.reconcile import load_status

Obj = dict[str, Any]


def rank0_address(pods: list[Obj]) -> str | None:
    for pod in pods:
        meta = pod.get("metadata", {})
        index = (meta.get("annotations") or {}).get(L.COMPLETION_INDEX_ANNOTATION)
        ip = pod.get("status", {}).get("podIP")
        if index == "0" and ip and pod.get("status", {}).get("phase") == "Running":
            return str(ip)
    return None


class Rank0Addresses:
    """Rank 0's pod IP per TrainingJob attempt, so that polls list an attempt's pods once, not every poll.

    A pod list by label makes the apiserver read every pod in the namespace, so one list per poll cost
    running jobs x pods every progress interval: quadratic in the number of jobs. An attempt's rank 0 is never
    replaced (backoffLimit 0: a failed pod fails the attempt, and the next attempt has a new number), so its
    address holds for as long as the attempt runs. Each key is touched by one poll at a time (Background runs
    one per job) and dict operations are atomic, so no lock.
    """

    def __init__(self) -> None:
        self._known: dict[tuple[str, str], tuple[int, str]] = {}

    def lookup(self, kube: Kube, namespace: str, name: str, attempt: int) -> str | None:
        known = self._known.get((namespace, name))
        if known is not None and known[0] == attempt:
            return known[1]
        address = rank0_address(kube.attempt_pods(namespace, name, attempt))
        if address is not None:
            self._known[(namespace, name)] = (attempt, address)
        return address

    def forget(self, namespace: str, name: str) -> None:
        """The job finished or is gone: nothing polls it any more."""
        self._known.pop((namespace, name), None)

    def __len__(self) -> int:
        return len(self._known)


def fetch_report(address: str, timeout_s: float, request: ControlRequest | None = None) -> TrainerReport | None:
    """GET the report, or POST ``request`` and get it in return."""
    base = f"http://{address}:{contract.METRICS_PORT}"
    if request is None:
        call = urllib.request.Request(base + contract.PROGRESS_PATH)
    else:
        body = request.model_dump_json(by_alias=True, exclude_none=True).encode()
        call = urllib.request.Request(base + contract.CONTROL_PATH, data=body, method="POST",
                                      headers={"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(call, timeout=timeout_s) as response:
        return parse_report(response.read(65536).decode("utf-8", "replace"))


def progress_patch(status: Obj, report: TrainerReport | None) -> Obj:
    """The status keys a report changes (empty when it changes nothing)."""
    current = load_status(status)
    patch: Obj = {}
    if report is None:
        return patch
    if report.progress is not None:
        progress = merge_model(current.progress, Progress, report.progress.to_dict())
        if progress is not None and progress != current.progress:
            patch["progress"] = progress.to_dict()
    if report.checkpoints is not None:
        checkpoints = merge_model(current.checkpoints, CheckpointStatus, report.checkpoints.to_dict())
        if checkpoints is not None and checkpoints != current.checkpoints:
            patch["checkpoints"] = checkpoints.to_dict()
    if report.control is not None:
        control = merge_model(current.control, ControlStatus, report.control.to_dict())
        if control is not None and control != current.control:
            patch["control"] = control.to_dict()
    return patch


def poll_progress(kube: Kube, body: Obj, timeout_s: float, addresses: Rank0Addresses) -> Obj:
    """One poll; returns the status patch it applied. Network errors propagate to the caller."""
    meta, status = body["metadata"], body.get("status") or {}
    attempt = int(status.get("attempt") or 0)
    address = addresses.lookup(kube, meta["namespace"], meta["name"], attempt) if attempt else None
    if address is None:
        return {}
    request = control_request(meta.get("annotations"), load_status(status).control)
    patch = progress_patch(status, fetch_report(address, timeout_s, request))
    if patch:
        kube.patch_trainingjob_status(meta["namespace"], meta["name"], patch)
    return patch
