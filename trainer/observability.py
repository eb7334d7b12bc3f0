"""Prometheus metrics and the rank-0 HTTP endpoint that serves them next to ``/progress``.

One server on ``KILN_METRICS_PORT`` (default 9400, ``0`` turns it off):
  GET /metrics   Prometheus text format, every series prefixed ``kiln_trainer_``
  GET /progress  the latest ``TrainerReport`` (kiln.api.contract) as JSON (the operator polls it)
"""

from __future__ import annotations

import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, Histogram, generate_latest

from kiln.trainer.progress import LatestSnapshot

log = logging.getLogger(__name__)

PREFIX = "kiln_trainer_"
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class TrainerMetrics:
    """The trainer's Prometheus series, in a registry of their own (no process-global state)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.loss = Gauge(f"{PREFIX}loss", "Training loss of the last optimizer step.", registry=r)
        self.learning_rate = Gauge(f"{PREFIX}learning_rate", "Learning rate of the first param group.", registry=r)
        self.epoch = Gauge(f"{PREFIX}epoch", "Epochs completed.", registry=r)
        self.step = Gauge(f"{PREFIX}step", "Optimizer steps completed.", registry=r)
        self.samples_per_second = Gauge(
            f"{PREFIX}samples_per_second", "Training images per second over all ranks.", registry=r
        )
        self.data_wait_seconds = Gauge(
            f"{PREFIX}data_wait_seconds", "Time the last step waited for the DataLoader.", registry=r
        )
        self.step_seconds = Histogram(
            f"{PREFIX}step_seconds", "Wall time of one training step.", buckets=STEP_BUCKETS, registry=r
        )
        self.validation = Gauge(f"{PREFIX}validation", "Latest validation metrics.", ["metric"], registry=r)
        self.checkpoint_save_seconds = Gauge(
            f"{PREFIX}checkpoint_save_seconds", "Duration of the last checkpoint save.", registry=r
        )
        self.accelerator_memory_bytes = Gauge(
            f"{PREFIX}accelerator_memory_bytes", "Peak accelerator memory allocated by this rank.", registry=r
        )

    def observe_step(
        self, *, loss: float, lr: float, step: int, seconds: float, data_wait: float, samples_per_second: float
    ) -> None:
        self.loss.set(loss)
        self.learning_rate.set(lr)
        self.step.set(step)
        self.step_seconds.observe(seconds)
        self.data_wait_seconds.set(data_wait)
        self.samples_per_second.set(samples_per_second)

    def observe_validation(self, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            self.validation.labels(metric=name).set(value)

    def observe_memory(self, device: torch.device) -> None:
        if device.type == "cuda":
            self.accelerator_memory_bytes.set(torch.cuda.max_memory_allocated(device))


class StatusServer:
    """A small threaded HTTP server for /metrics and /progress; rank 0 only."""

    def __init__(self, port: int, metrics: TrainerMetrics, progress: LatestSnapshot, host: str = "0.0.0.0") -> None:
        routes = {
            "/metrics": lambda: (CONTENT_TYPE_LATEST, generate_latest(metrics.registry)),
            "/progress": lambda: ("application/json", progress.json_bytes()),
        }

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                route = routes.get(self.path.split("?", 1)[0])
                if route is None:
                    self.send_error(404, "try /metrics or /progress")
                    return
                content_type, body = route()
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="kiln-status", daemon=True)

    def start(self) -> StatusServer:
        self._thread.start()
        log.info("serving /metrics and /progress on port %d", self.port)
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
