"""Prometheus metrics and the /metrics, /healthz and /readyz endpoints.

Series (all prefixed kiln_operator_ except the gauges, named for what users query):
  kiln_operator_reconcile_total{kind,result}        reconciles by trigger kind and result (ok, error)
  kiln_operator_reconcile_duration_seconds{kind}    reconcile latency histogram
  kiln_operator_queue_wait_seconds                  creation to the first attempt's start (Pending/Queued -> Running)
  kiln_trainingjobs{phase}                          TrainingJobs this operator sees, by phase
  kiln_trainingjob_phase{trainingjob_namespace,trainingjob,phase}  1 for each TrainingJob's current phase
  kiln_trainingjob_restarts{trainingjob_namespace,trainingjob}     each TrainingJob's status.restarts
  kiln_trainingjob_blocked{trainingjob_namespace,trainingjob,reason}  1 while a pod of it cannot start (Running=False
                                                                   with a reason in kiln.api.status.BLOCKED_REASONS)
  kiln_operator_trainingjobs_created_total / _succeeded_total / _failed_total / _restarted_total

The per-job series carry kiln.api.contract.MetricLabel's names, as the trainer's do, so the two join.
"""

from __future__ import annotations

import threading
from collections import Counter as Tally
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kiln.api.contract import MetricLabel
from kiln.api.status import BLOCKED_REASONS, ConditionType, Phase

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


WAITING_PHASES = frozenset({Phase.PENDING.value, Phase.QUEUED.value})
JOB_LABELS = [MetricLabel.NAMESPACE, MetricLabel.JOB]


@dataclass(frozen=True)
class JobSeen:
    namespace: str
    name: str
    phase: str
    restarts: int
    blocked: str | None = None
    """The reason a pod of the current attempt cannot start, from the Running condition; None when none."""


class _PhaseCollector(Collector):
    """Every TrainingJob's phase and restarts as the watch last delivered them, turned into gauges on scrape."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: dict[str, JobSeen] = {}

    def observe(self, uid: str, seen: JobSeen | None) -> JobSeen | None:
        """Record (None: forget) a job; returns what was recorded before."""
        with self._lock:
            before = self._jobs.get(uid)
            if seen is None:
                self._jobs.pop(uid, None)
            else:
                self._jobs[uid] = seen
            return before

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            jobs = list(self._jobs.values())
        tally = Tally(job.phase for job in jobs)
        family = GaugeMetricFamily("kiln_trainingjobs", "TrainingJobs by phase.", labels=["phase"])
        for phase in Phase:
            family.add_metric([phase.value], tally.get(phase.value, 0))
        yield family
        phases = GaugeMetricFamily("kiln_trainingjob_phase", "1 for each TrainingJob's current phase.",
                                   labels=[*JOB_LABELS, "phase"])  # fmt: skip
        restarts = GaugeMetricFamily("kiln_trainingjob_restarts", "Whole-gang restarts of each TrainingJob.",
                                     labels=JOB_LABELS)  # fmt: skip
        blocked = GaugeMetricFamily("kiln_trainingjob_blocked", "1 while a pod of the TrainingJob cannot start.",
                                    labels=[*JOB_LABELS, "reason"])  # fmt: skip
        for job in jobs:
            phases.add_metric([job.namespace, job.name, job.phase], 1)
            restarts.add_metric([job.namespace, job.name], job.restarts)
            if job.blocked is not None:
                blocked.add_metric([job.namespace, job.name, job.blocked], 1)
        yield phases
        yield restarts
        yield blocked


def queue_wait_seconds(body: Mapping[str, Any]) -> float | None:
    """From the TrainingJob's creation to its first attempt's start (status.startTime); None if either is unset."""
    created = (body.get("metadata") or {}).get("creationTimestamp")
    started = (body.get("status") or {}).get("startTime")
    if not created or not started:
        return None
    try:
        return max(0.0, (datetime.fromisoformat(started) - datetime.fromisoformat(created)).total_seconds())
    except (TypeError, ValueError):
        return None


def blocked_reason(status: Mapping[str, Any]) -> str | None:
    """Running=False's reason when it says a pod cannot start (pending.explain_waiting writes it)."""
    for condition in status.get("conditions") or []:
        if condition.get("type") == ConditionType.RUNNING and condition.get("status") == "False":
            reason = condition.get("reason")
            return reason if reason in BLOCKED_REASONS else None
    return None


class Metrics:
    """One registry per operator instance (tests run several in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.reconciles = Counter(
            "kiln_operator_reconcile",
            "Reconciles by trigger kind and result.",
            ["kind", "result"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "kiln_operator_reconcile_duration_seconds",
            "Reconcile duration.",
            ["kind"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.created = Counter(
            "kiln_operator_trainingjobs_created", "TrainingJobs whose children were created.", registry=self.registry
        )
        self.succeeded = Counter(
            "kiln_operator_trainingjobs_succeeded", "TrainingJobs that succeeded.", registry=self.registry
        )
        self.failed = Counter("kiln_operator_trainingjobs_failed", "TrainingJobs that failed.", registry=self.registry)
        self.restarted = Counter("kiln_operator_trainingjobs_restarted", "Whole-gang restarts.", registry=self.registry)
        self.queue_wait = Histogram(
            "kiln_operator_queue_wait_seconds",
            "From a TrainingJob's creation to its first attempt's start (Pending or Queued to Running).",
            buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400),
            registry=self.registry,
        )
        self._queue_waits_seen: set[str] = set()
        self.phases = _PhaseCollector()
        self.registry.register(self.phases)
        self.ready = threading.Event()

    def observe_trainingjob(self, uid: str, namespace: str, name: str, body: Mapping[str, Any] | None) -> None:
        """A TrainingJob as the watch delivered it (None: deleted): its phase and restarts, and its queue wait
        once, when it moves from Pending or Queued to Running for the first time this operator sees."""
        if body is None:
            self.phases.observe(uid, None)
            self._queue_waits_seen.discard(uid)
            return
        status = body.get("status") or {}
        phase = status.get("phase") or Phase.PENDING.value
        seen = JobSeen(namespace, name, phase, int(status.get("restarts") or 0), blocked_reason(status))
        before = self.phases.observe(uid, seen)
        if before is not None and before.phase in WAITING_PHASES and phase == Phase.RUNNING.value:
            wait = queue_wait_seconds(body)
            if wait is not None and uid not in self._queue_waits_seen:
                self._queue_waits_seen.add(uid)
                self.queue_wait.observe(wait)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def make_app(metrics: Metrics) -> web.Application:
    async def serve_metrics(_: web.Request) -> web.Response:
        return web.Response(body=metrics.exposition(), headers={"Content-Type": CONTENT_TYPE})

    async def healthz(_: web.Request) -> web.Response:
        # Answering at all proves the event loop is alive; kopf's own watchers run on the same loop.
        return web.Response(text="ok")

    async def readyz(_: web.Request) -> web.Response:
        return web.Response(text="ready") if metrics.ready.is_set() else web.Response(status=503, text="starting")

    app = web.Application()
    app.router.add_get("/metrics", serve_metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


async def start_server(metrics: Metrics, port: int, host: str = "0.0.0.0") -> web.AppRunner:
    runner = web.AppRunner(make_app(metrics), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
