"""Which watch events need a reconcile: most do not, and each reconcile costs apiserver round trips.

``Generations`` is read by the TrainingJobs' watch threads (``watches``; they filter before handing work to a
thread) and by that work when it starts, and written by ``reconciled``, one dict store from a handler thread, and
``forget`` on the event loop. ``JobStates`` is touched by the Jobs' watches only, each of its own namespaces' Jobs.
"""

from __future__ import annotations

from typing import Any

import kopf

Obj = dict[str, Any]


class Generations:
    """The TrainingJob generations reconciled by this process, by uid.

    A TrainingJob event needs a reconcile only when its uid was never reconciled here (a new TrainingJob, or one
    first seen after this operator started) or its generation moved on (a spec change). Every other event is the
    operator's own status write or a metadata change, which the reconcile does not read. Each TrainingJob is
    triggered by its watch events directly (``watches``), not through kopf's create/update/resume handlers: those
    cost a PATCH per job (kopf's annotation) and a re-run of the creation on a stale body whenever kopf's wait for
    its own PATCH timed out on a busy apiserver.
    """

    def __init__(self) -> None:
        self._done: dict[str, Any] = {}

    def wanted(self, body: kopf.Body | Obj) -> bool:
        meta = body["metadata"]
        uid = meta.get("uid")
        return uid not in self._done or self._done[uid] != meta.get("generation")

    def unreconciled(self, body: kopf.Body | Obj) -> Obj | None:
        """The body itself when nothing can be newer than it in what a reconcile reads: never reconciled here and
        no status yet (a TrainingJob just created); None when it must be read fresh."""
        if body["metadata"].get("uid") in self._done or body.get("status"):
            return None
        return dict(body)

    def reconciled(self, body: Obj) -> None:
        meta = body["metadata"]
        self._done[meta.get("uid")] = meta.get("generation")

    def forget(self, uid: str) -> None:
        self._done.pop(uid, None)


class JobStates:
    """The last state of each attempt's (or export's) Job seen, by namespace/name."""

    def __init__(self) -> None:
        self._seen: dict[str, tuple[Any, ...]] = {}

    def changed(self, namespace: str | None, body: kopf.Body | Obj, type: str) -> bool:
        """Whether a Job event changes anything its owner's status reflects (most Job updates do not)."""
        key, signature = f"{namespace}/{body['metadata']['name']}", job_signature(body)
        previous = self._seen.get(key)
        if type == "DELETED":
            self._seen.pop(key, None)
            return True
        self._seen[key] = signature
        return not (previous == signature or (previous is None and signature[1:6] == EMPTY_JOB_COUNTS))


def job_signature(job: kopf.Body | Obj) -> tuple[Any, ...]:
    """What a reconcile reads from a Job: suspension, pod counts, true conditions, deadline."""
    spec, status = job.get("spec") or {}, job.get("status") or {}
    conditions = tuple(sorted(c.get("type", "") for c in status.get("conditions") or [] if c.get("status") == "True"))
    counts = tuple(int(status.get(key) or 0) for key in ("active", "ready", "succeeded", "failed"))
    return (bool(spec.get("suspend")), *counts, conditions, spec.get("activeDeadlineSeconds"))


EMPTY_JOB_COUNTS = (0, 0, 0, 0, ())
"""A Job just created by the operator: its first events change nothing in the TrainingJob's status."""
