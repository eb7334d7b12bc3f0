"""Every kopf knob the operator changes, in one place."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import kopf

from kiln.operator import labels as L
from kiln.operator.settings import Settings

CHANGE_HANDLED_KINDS = frozenset({L.EJ_KIND})
"""Kinds with kopf create/update/resume handlers (ExportJobs). TrainingJobs are handled from raw watch events
(``on.event``), which never read kopf's diff; their children are watched outside kopf (``child_watch``)."""


class ChangeHandledDiffBase(kopf.AnnotationsDiffBaseStorage):
    """kopf's annotation diff base, built only for the kinds that have change handlers.

    kopf builds an object's "essence" (a deep copy of its body) for every watch event of every watched kind, on
    the event loop, whether or not any handler will read the diff. In the 200-job benchmark that copy was a fifth
    of the operator's CPU samples (mostly of Jobs, which kopf watched then). TrainingJobs, whose handlers read no
    diff, get an empty essence: there is no stored one to compare with, so the diff is empty too.
    """

    def __init__(self, kinds: Iterable[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.kinds = frozenset(kinds)

    def build(self, *, body: kopf.Body, extra_fields: Iterable[Any] | None = None) -> Any:
        if body.get("kind") not in self.kinds:
            return {}
        return super().build(body=body, extra_fields=extra_fields)


def apply_kopf_settings(settings: kopf.OperatorSettings, ours: Settings) -> None:
    # Keep kopf's bookkeeping in annotations: status has a strict schema that would prune status.kopf.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="kiln.dev")
    settings.persistence.diffbase_storage = ChangeHandledDiffBase(
        CHANGE_HANDLED_KINDS, prefix="kiln.dev", key="last-handled-configuration"
    )
    # kopf waits this long for the watch to deliver its own annotation patch before handling newer events
    # (ExportJobs' create/resume handlers; TrainingJobs use none): a saturated apiserver took > 5 s (the
    # default) in the 200-job benchmark, and kopf then re-ran the create handler on the stale event.
    settings.persistence.consistency_timeout = 30
    # Only explicit transition Events and warnings reach the cluster, not every "handler succeeded" line.
    settings.posting.level = logging.WARNING
    settings.posting.reporting_component = "kiln-operator"
    # Blocking handlers run in this many threads (see Settings.workers).
    settings.execution.max_workers = ours.workers
    # Watches silently stall behind some load balancers without timeouts (nolar/kopf#585, #847): ask the
    # server to end each watch after 5 minutes and give up on a silent connection a bit later.
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.connect_timeout = 30
    settings.networking.request_timeout = 60
