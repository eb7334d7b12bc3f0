"""``kiln operator``: run the operator with kopf's runner, configured from Settings only."""

from __future__ import annotations

import json
import logging
from typing import Any

import kopf

from kiln.operator.handlers import build_registry
from kiln.operator.settings import Settings


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        k8s = getattr(record, "k8s_ref", None)
        if k8s:
            entry["object"] = k8s
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(settings: Settings, verbose: bool = False) -> None:
    handler = logging.StreamHandler()
    if settings.json_logs:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    # The kubernetes client logs every request at DEBUG; keep it out unless asked.
    logging.getLogger("kubernetes").setLevel(logging.WARNING)
    # kopf logs every successful handler call at INFO; transitions are logged as Events instead.
    if not verbose:
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)


def run(settings: Settings, *, verbose: bool = False) -> None:
    """Block until SIGINT/SIGTERM. One replica at a time (standalone: no kopf peering objects needed)."""
    configure_logging(settings, verbose)
    for key in settings.extra:
        logging.getLogger(__name__).warning("ignoring unknown setting %s", key)
    registry, _ = build_registry(settings)
    kopf.run(
        registry=registry,
        standalone=True,
        clusterwide=not settings.namespaces,
        namespaces=settings.namespaces,
    )
