"""``kiln operator``: stand by until this replica holds the leader Lease, then run kopf; configured from Settings.

Every replica serves /metrics, /healthz and /readyz from the start (a standby is Ready: a Deployment of two
counts both available). Only the Lease holder runs kopf, so only it reconciles; a standby runs no watch at all
and takes over with a fresh start, exactly as a restarted operator does (resume handlers, adopt-on-409).
The Lease itself is held by a forked child process (``kiln.operator.leader``), which SIGSTOPs this one while
the Lease cannot be renewed (SIGCONT once it is again: kopf reconnects its watches by itself and retries the
handlers that failed meanwhile), and SIGKILLs it if the Lease is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import threading
import time
from typing import Any

import kopf

from kiln.operator import credentials as creds
from kiln.operator import labels as L
from kiln.operator.handlers import Context, build_registry
from kiln.operator.kube import Kube, load_api_client
from kiln.operator.leader import LeaderElector, hold_lease
from kiln.operator.metrics import start_server
from kiln.operator.settings import Settings

EXIT_LEASE_PROCESS_DIED = 1
"""Exit status when the lease process died while this replica led: nothing renews the Lease any more."""
log = logging.getLogger(__name__)


class LeaseProcess:
    """The child process that holds the Lease (``leader.hold_lease``), seen from the operator."""

    def __init__(self, settings: Settings, credentials: creds.Credentials, identity: str) -> None:
        """Fork it; call before any thread starts (a forked child gets only the forking thread). The child uses the
        operator's credentials as loaded; the Lease lives in the namespace of that identity: its pod's, else the
        kubeconfig context's (the Helm release's namespace, where the chart grants the Lease)."""
        namespace = credentials.endpoint.namespace or "default"
        self.namespace, self.stopping = namespace, False
        commands_in, commands_out = os.pipe()
        events_in, events_out = os.pipe()
        operator_pid = os.getpid()
        self.pid = os.fork()
        if self.pid == 0:  # the lease process
            os.close(commands_out)
            os.close(events_in)
            code = 1
            try:
                api = load_api_client(2, credentials)
                elector = LeaderElector(Kube(api, timeout_s=settings.renew_deadline_s), namespace,
                                        L.LEADER_LEASE, identity, settings.lease_duration_s)  # fmt: skip
                code = hold_lease(elector, renew_deadline_s=settings.renew_deadline_s,
                                  retry_period_s=settings.retry_period_s, commands=commands_in, events=events_out,
                                  operator_pid=operator_pid)  # fmt: skip
            except BaseException:
                log.exception("the lease process failed")
            finally:
                logging.shutdown()
                os._exit(code)
        os.close(commands_in)
        os.close(events_out)
        self.commands, self.events = os.fdopen(commands_out, "w"), os.fdopen(events_in, "r")

    def wait_for_lead(self, on_standby: Any) -> None:
        """Block until the child holds the Lease; ``on_standby(holder)`` when it says it waits for another."""
        for line in self.events:
            word, _, rest = line.strip().partition(" ")
            if word == "leader":
                threading.Thread(target=self._exit_if_it_dies, name="kiln-lease-watch", daemon=True).start()
                return
            if word == "standby":
                on_standby(rest)
        raise RuntimeError(f"the lease process exited ({self._reap()}) before acquiring the Lease")

    def _reap(self) -> int:
        return os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])

    def _exit_if_it_dies(self) -> None:
        code = self._reap()
        if not self.stopping:
            log.error("the lease process exited %s while this replica led; exiting", code)
            logging.shutdown()
            os._exit(EXIT_LEASE_PROCESS_DIED)

    def release(self) -> None:
        """Tell the child to give the Lease up (a clean stop), and give it a moment to."""
        self.stopping = True
        try:
            self.commands.write("release\n")
            self.commands.close()
        except OSError as exc:
            log.warning("the lease process is gone; the Lease expires instead of being released: %s", exc)
            return
        for _ in range(100):  # reaped by _exit_if_it_dies's thread when leading, else here
            try:
                if os.waitpid(self.pid, os.WNOHANG) != (0, 0):
                    return
            except ChildProcessError:
                return
            time.sleep(0.1)
        log.warning("the lease process did not release the Lease in 10 s; it expires instead")
        os.kill(self.pid, signal.SIGKILL)


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
    # kopf logs every successful handler call at INFO; transitions are logged as Events instead.
    if not verbose:
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)


def replica_identity() -> str:
    """This replica's name in the Lease: its pod's name (HOSTNAME, which the kubelet sets), unique among live
    pods. A restarted container keeps it, so it re-acquires its own Lease at once instead of waiting it out."""
    return os.environ.get("HOSTNAME") or socket.gethostname()


def leave_pid_1() -> None:
    """As a PID namespace's init (a container's PID 1), fork the operator off and stay a minimal init: forward
    SIGTERM, SIGINT and SIGHUP to it, reap orphans, and exit with its status (128 + the signal's number if a
    signal ended it). Returns in the operator only; elsewhere it does nothing.

    Why: the kernel drops every signal sent to a namespace's init from inside the namespace unless init handles
    it, so the lease process's SIGSTOP and SIGKILL would be dropped silently, and the fence with them."""
    if os.getpid() != 1:
        return
    operator = os.fork()
    if operator == 0:
        return

    def forward(signum: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(operator, signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    while True:
        pid, status = os.waitpid(-1, 0)  # any child: orphans (a lease process outliving the operator) are ours
        if pid == operator:
            code = os.waitstatus_to_exitcode(status)
            os._exit(128 - code if code < 0 else code)


def run(settings: Settings, *, verbose: bool = False) -> None:
    """Block until SIGINT/SIGTERM (kopf stops, the Lease is released), or until the Lease is lost (the lease
    process SIGKILLs this one) or the lease process dies while this replica leads (exit 1). While the Lease cannot
    be renewed past the renew deadline, this process is stopped (SIGSTOP) until it is renewed again."""
    leave_pid_1()  # before anything else: one init, doing nothing but wait
    configure_logging(settings, verbose)
    for key in settings.extra:
        log.warning("ignoring unknown setting %s", key)
    registry, ctx = build_registry(settings)
    # Before the fork: a missing or broken kubeconfig stops the operator here, in one line (CredentialsError).
    lease = LeaseProcess(settings, ctx.credentials(), replica_identity())  # forks: no thread may run yet
    asyncio.run(_lead(settings, registry, ctx, lease))


async def _lead(settings: Settings, registry: kopf.OperatorRegistry, ctx: Context, lease: LeaseProcess) -> None:
    ctx.server = await start_server(ctx.metrics, settings.metrics_port)

    def standing_by(holder: str) -> None:
        log.info("standing by: Lease %s/%s is held by %r", lease.namespace, L.LEADER_LEASE, holder)
        ctx.metrics.ready.set()

    await asyncio.to_thread(lease.wait_for_lead, standing_by)
    ctx.metrics.ready.clear()  # Ready again once kopf's start-up hook ran
    try:
        await kopf.operator(
            registry=registry,
            standalone=True,  # no kopf peering: the Lease already makes this the only reconciling replica
            clusterwide=not settings.namespaces,
            namespaces=settings.namespaces,
        )
    finally:
        lease.release()
