"""Prometheus metrics, and the HTTP endpoint every rank serves them on (global rank 0 also serves ``/progress``).

Each rank runs one server (``status_port``: ``KILN_METRICS_PORT`` + local rank, or its entry in
``KILN_METRICS_PORTS``; port 0 turns it off):
  GET /metrics   Prometheus text format, every series prefixed ``kiln_trainer_`` and labelled with the job,
                 the global rank and the node rank (kiln.api.contract.MetricLabel), so a straggler shows up
  GET /progress  global rank 0 only: the latest ``TrainerReport`` (kiln.api.contract) as JSON (the operator
                 polls it)
  POST /control  global rank 0 only: a ``ControlRequest`` (stop, checkpoint now; ``kiln.trainer.control``);
                 the answer is the report, as on /progress

docs/operations.md ("Dashboards and alerts") lists the series and what the shipped dashboards and alerts make of
them.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, Histogram, generate_latest
from pydantic import ValidationError

from kiln.api import contract
from kiln.api.contract import ControlRequest, Env, MetricLabel
from kiln.trainer.control import ControlState
from kiln.trainer.progress import LatestSnapshot

log = logging.getLogger(__name__)

PREFIX = "kiln_trainer_"
CONTROL_BODY_LIMIT = 4096
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def rank_labels(namespace: str, name: str, rank: int, node_rank: int) -> dict[str, str]:
    """The labels every series of one rank carries."""
    return {MetricLabel.NAMESPACE: namespace, MetricLabel.JOB: name, MetricLabel.RANK: str(rank),
            MetricLabel.NODE_RANK: str(node_rank)}  # fmt: skip


class TrainerMetrics:
    """One rank's Prometheus series, in a registry of their own (no process-global state).

    ``labels`` (``rank_labels``) go on every series. Step timings are sampled on the steps the engine logs
    (every ``LOG_EVERY_STEPS``-th optimizer step), as loss is: reading them needs no extra device sync.
    """

    def __init__(self, labels: Mapping[str, str] | None = None, *, restarts: int = 0) -> None:
        self.registry = CollectorRegistry()
        self._labels = dict(labels or {})
        names = list(self._labels)

        def gauge(name: str, doc: str) -> Any:
            return self._bind(Gauge(f"{PREFIX}{name}", doc, names, registry=self.registry))

        def histogram(name: str, doc: str) -> Any:
            return self._bind(Histogram(f"{PREFIX}{name}", doc, names, buckets=STEP_BUCKETS, registry=self.registry))

        self.step_seconds = histogram("step_seconds", "Wall time of one training step, data wait included.")
        self.data_wait_seconds = histogram("data_wait_seconds", "Time that step waited for the DataLoader.")
        self.samples_per_second = gauge("samples_per_second", "Training images per second on this rank.")
        self.loss = gauge("loss", "Training loss, averaged since the last sample.")
        self._loss_terms = Gauge(f"{PREFIX}loss_term", "Unweighted terms of a combined training loss.",
                                 [*names, "term"], registry=self.registry)  # fmt: skip
        self.learning_rate = gauge("learning_rate", "Learning rate of the first param group.")
        self._validation = Gauge(f"{PREFIX}validation", "Latest validation metrics.", [*names, "metric"],
                                 registry=self.registry)  # fmt: skip
        self.epoch = gauge("epoch", "Epochs completed.")
        self.step = gauge("step", "Optimizer steps completed.")
        self.progress_ratio = gauge("progress_ratio", "Fraction of the run's optimizer steps completed (0 to 1).")
        # The checkpoint series appear on the rank that writes checkpoints (global rank 0) once it has saved.
        self._checkpoint_save_seconds = Gauge(f"{PREFIX}checkpoint_save_seconds", "Duration of the last "
                                              "checkpoint save.", names, registry=self.registry)  # fmt: skip
        self._checkpoint_size_bytes = Gauge(f"{PREFIX}checkpoint_size_bytes", "Size of the last checkpoint.",
                                            names, registry=self.registry)  # fmt: skip
        self._checkpoint_saved_at = Gauge(f"{PREFIX}checkpoint_last_save_timestamp_seconds", "Unix time of the "
                                          "last checkpoint save; its age is time() minus this.", names,
                                          registry=self.registry)  # fmt: skip
        gauge("start_timestamp_seconds", "Unix time this trainer process started.").set(time.time())
        gauge("restarts", "Whole-gang restarts of the job before this attempt.").set(restarts)
        # Only where there is a GPU: a CPU rank has no accelerator memory to report.
        self._accelerator_memory = Gauge(f"{PREFIX}accelerator_memory_bytes", "Peak accelerator memory "
                                         "allocated by this rank.", names, registry=self.registry)  # fmt: skip

    def _bind(self, metric: Any) -> Any:
        # prometheus_client refuses .labels() on a series declared without label names (an unlabelled
        # TrainerMetrics(), as in-process tests build).
        return metric.labels(**self._labels) if self._labels else metric

    def observe_step(
        self,
        *,
        loss: float,
        lr: float,
        step: int,
        seconds: float,
        data_wait: float,
        samples_per_second: float,
        terms: Mapping[str, float] | None = None,
        progress: float | None = None,
    ) -> None:
        self.loss.set(loss)
        self.learning_rate.set(lr)
        self.step.set(step)
        self.step_seconds.observe(seconds)
        self.data_wait_seconds.observe(data_wait)
        self.samples_per_second.set(samples_per_second)
        for name, value in (terms or {}).items():
            self._loss_terms.labels(**self._labels, term=name).set(value)
        if progress is not None:
            self.progress_ratio.set(progress)

    def observe_validation(self, metrics: Mapping[str, float]) -> None:
        for name, value in metrics.items():
            self._validation.labels(**self._labels, metric=name).set(value)

    def observe_checkpoint(self, *, seconds: float, size_bytes: int | None) -> None:
        self._bind(self._checkpoint_save_seconds).set(seconds)
        if size_bytes is not None:
            self._bind(self._checkpoint_size_bytes).set(size_bytes)
        self._bind(self._checkpoint_saved_at).set(time.time())

    def observe_memory(self, device: torch.device) -> None:
        if device.type == "cuda":
            self._bind(self._accelerator_memory).set(torch.cuda.max_memory_allocated(device))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def status_port(local_rank: int, environ: Mapping[str, str] = os.environ) -> int:
    """This rank's /metrics port: its entry in KILN_METRICS_PORTS, else KILN_METRICS_PORT + local rank; 0: none."""
    listed = environ.get(Env.METRICS_PORTS, "").strip()
    if listed:
        ports = [int(port) for port in listed.split(",")]
        return ports[local_rank] if local_rank < len(ports) else 0
    base = int(environ.get(Env.METRICS_PORT, str(contract.METRICS_PORT)))
    return base + local_rank if base else 0


class StatusServer:
    """A small threaded HTTP server for /metrics (every rank), and /progress and /control (when given: global
    rank 0)."""

    def __init__(
        self,
        port: int,
        metrics: TrainerMetrics,
        progress: LatestSnapshot | None,
        host: str = "0.0.0.0",
        control: ControlState | None = None,
    ) -> None:
        def report() -> tuple[str, bytes]:
            assert progress is not None
            body = progress.json_bytes()
            live = control.status() if control is not None else None
            if live is not None:  # what the HTTP thread just received shows at once, not at the next report
                body = json.dumps({**json.loads(body), "control": live.to_dict()}, separators=(",", ":")).encode()
            return "application/json", body

        routes = {"/metrics": lambda: (CONTENT_TYPE_LATEST, metrics.exposition())}
        if progress is not None:
            routes[contract.PROGRESS_PATH] = report
        missing = "try " + " or ".join(sorted(routes))

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                route = routes.get(self.path.split("?", 1)[0])
                if route is None:
                    self.send_error(404, missing)
                    return
                self._send(*route())

            def do_POST(self) -> None:
                if self.path.split("?", 1)[0] != contract.CONTROL_PATH or control is None or progress is None:
                    self.send_error(404, f"POST {contract.CONTROL_PATH} on global rank 0 only")
                    return
                length = int(self.headers.get("Content-Length") or 0)
                if length > CONTROL_BODY_LIMIT:
                    self.send_error(413, f"a control request is at most {CONTROL_BODY_LIMIT} bytes")
                    return
                try:
                    request = ControlRequest.model_validate_json(self.rfile.read(length))
                except ValidationError as exc:
                    self.send_error(400, f"not a ControlRequest: {exc.errors()[0]['msg']}")
                    return
                control.request(request)
                self._send(*report())

            def _send(self, content_type: str, body: bytes) -> None:
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._paths = sorted(routes)
        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="kiln-status", daemon=True)

    def start(self) -> StatusServer:
        self._thread.start()
        log.info("serving %s on port %d", " and ".join(self._paths), self.port)
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
