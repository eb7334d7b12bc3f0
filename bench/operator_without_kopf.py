"""Kiln's operator without kopf, aiohttp and typer: a measurement of what an operator free of them would weigh.

Issue 13 asks for the operator's peak RSS at or below Kubeflow's training-operator. kopf (with aiohttp, which it
requires) is about 18 MB of Kiln's imports, and by now it runs only the process's activities and the ExportJobs;
the TrainingJobs and their children are reconciled by the operator's own watches, work queue and threads. This
process starts exactly that machinery (``handlers.start_reconciling``, the same leader Lease, the same settings)
and serves /metrics from the standard library's HTTP server, with the two packages replaced by stand-ins that
hold the few names the operator's modules import. Nothing of kopf's runs in the TrainingJob path, so the
benchmarks' TrainingJobs are reconciled as they are by ``kiln operator``; ExportJobs are not reconciled here.

Not an operator to ship: a counterfactual for the benchmarks (``--without-kopf`` in bench/operator_scale.py and
``--kiln-without-kopf`` in bench/operator_vs_kubeflow.py), which start it in place of ``kiln operator``.
"""

from __future__ import annotations

import sys
import types


class _TemporaryError(Exception):
    """kopf.TemporaryError as the operator's retries raise and catch it (``handlers.retry_later``)."""

    def __init__(self, message: str = "", delay: float | None = None) -> None:
        super().__init__(message)
        self.delay = delay


def _match_namespace(name: str, pattern: str) -> bool:
    raise NotImplementedError("this measurement watches the whole cluster; KILN_OPERATOR_NAMESPACES is kopf's")


def _stand_in_for_kopf_and_aiohttp() -> None:
    """Before kiln.operator is imported: modules named kopf and aiohttp.web holding what the operator's modules
    import from them, so that neither package is loaded."""
    kopf = types.ModuleType("kopf")
    kopf.TemporaryError = _TemporaryError  # type: ignore[attr-defined]
    kopf.PermanentError = type("PermanentError", (Exception,), {})  # type: ignore[attr-defined]
    kopf.LoginError = type("LoginError", (Exception,), {})  # type: ignore[attr-defined]
    references = types.ModuleType("kopf._cogs.structs.references")
    references.match_namespace = _match_namespace  # type: ignore[attr-defined]
    web = types.ModuleType("aiohttp.web")
    web.AppRunner = object  # type: ignore[attr-defined]
    aiohttp = types.ModuleType("aiohttp")
    aiohttp.web = web  # type: ignore[attr-defined]
    packages = {name: types.ModuleType(name) for name in ("kopf._cogs", "kopf._cogs.structs")}
    sys.modules.update(packages, kopf=kopf, aiohttp=aiohttp)
    sys.modules.update({"kopf._cogs.structs.references": references, "aiohttp.web": web})


def main() -> None:
    _stand_in_for_kopf_and_aiohttp()

    import asyncio
    import http.server
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from kiln.operator import settings as operator_settings
    from kiln.operator.handlers import Context, start_reconciling
    from kiln.operator.metrics import CONTENT_TYPE
    from kiln.operator.runner import LeaseProcess, configure_logging, replica_identity

    settings = operator_settings.from_env()
    configure_logging(settings, verbose=False)
    ctx = Context(settings=settings)
    lease = LeaseProcess(settings, ctx.credentials(), replica_identity())  # forks: before any thread

    class Metrics(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = ctx.metrics.exposition() if self.path == "/metrics" else b"ok"
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", settings.metrics_port), Metrics)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()

    async def lead() -> None:
        await asyncio.to_thread(lease.wait_for_lead, lambda holder: None)
        start_reconciling(ctx, ThreadPoolExecutor(settings.workers))
        ctx.metrics.ready.set()
        await asyncio.Event().wait()  # until the benchmark terminates this process

    asyncio.run(lead())


if __name__ == "__main__":
    main()
