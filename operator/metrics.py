"""Prometheus metrics and the /metrics, /healthz and /readyz endpoints.

Series (all prefixed kiln_operator_ except the gauge, named for what users query):
  kiln_operator_reconcile_total{kind,result}        reconciles by trigger kind and result (ok, error)
  kiln_operator_reconcile_duration_seconds{kind}    reconcile latency histogram
  kiln_trainingjobs{phase}                          TrainingJobs this operator sees, by phase
  kiln_operator_trainingjobs_created_total / _succeeded_total / _failed_total / _restarted_total
"""

from __future__ import annotations

import threading
from collections import Counter as Tally
from collections.abc import Iterator

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kiln.api.status import Phase

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _PhaseCollector(Collector):
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._phases: dict[str, str] = {}

    def observe(self, uid: str, phase: str | None) -> None:
        with self._lock:
            if phase is None:
                self._phases.pop(uid, None)
            else:
                self._phases[uid] = phase

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            tally = Tally(self._phases.values())
        family = GaugeMetricFamily("kiln_trainingjobs", "TrainingJobs by phase.", labels=["phase"])
        for phase in Phase:
            family.add_metric([phase.value], tally.get(phase.value, 0))
        yield family


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
        self.phases = _PhaseCollector()
        self.registry.register(self.phases)
        self.ready = threading.Event()

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
