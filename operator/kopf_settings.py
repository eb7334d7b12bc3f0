"""Every kopf knob the operator changes, in one place."""

from __future__ import annotations

import logging

import kopf

from kiln.operator.settings import Settings


def apply_kopf_settings(settings: kopf.OperatorSettings, ours: Settings) -> None:
    # Keep kopf's bookkeeping in annotations: status has a strict schema that would prune status.kopf.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="kiln.dev")
    # kopf watches only ExportJobs: TrainingJobs and every child are watched outside it (``watches``).
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="kiln.dev", key="last-handled-configuration"
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
