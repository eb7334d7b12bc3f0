"""The handlers: thin wrappers that fetch, reconcile under a per-job lock, and report.

kopf runs the process's activities (login, start-up, clean-up) and the ExportJobs' handlers; the start-up
handler starts the watches of TrainingJobs and of the children (``watches``), whose events queue their work
for the same threads (``_watch_handlers``). ``build_registry(settings)`` registers everything on a fresh registry
and returns it with the shared ``Context`` (API client, metrics, locks), so several operators can run in one
process (tests) and nothing lives in module globals.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import kopf
import urllib3
from aiohttp import web

from kiln.api.status import ConditionType, Phase
from kiln.operator import credentials as creds
from kiln.operator import labels as L
from kiln.operator.background import RETRY_DELAY_S, TERMINAL, Background, Schedule, without_managed_fields
from kiln.operator.conditions import Transition
from kiln.operator.drift import repair_children
from kiln.operator.export_reconcile import ExportOutcome, reconcile_export, waits_for
from kiln.operator.held import Held, held_due
from kiln.operator.kopf_settings import apply_kopf_settings
from kiln.operator.kube import ApiException, Kube, is_status, load_api_client
from kiln.operator.metrics import Metrics, start_server
from kiln.operator.progress import Rank0Addresses, poll_progress
from kiln.operator.reconcile import Outcome, Stale, reconcile
from kiln.operator.settings import Settings
from kiln.operator.status import job_view
from kiln.operator.triggers import Generations, JobStates
from kiln.operator.watches import CONFIGMAPS, JOBS, SERVICES, TRAININGJOBS, Handler, Kind, Watches
from kiln.operator.workqueue import WorkQueue

Obj = dict[str, Any]
EJ = (L.TJ_GROUP, L.TJ_VERSION, L.EJ_PLURAL)
JOB_PROGRESS_BATCH_S = 1.5
"""Seconds a Job update on the way to a condition waits before its reconcile (pods created, some ready), so that
the update that turns the condition joins it: the Job controller writes a Job's status at most once a second (its
sync batch period), and each reconcile is a status write. In a burst of new TrainingJobs the wait also
leaves the threads and the apiserver to the creations first. An update that turns a condition (every worker
ready: Running; Complete, Failed; suspended) or a deleted Job is reconciled at once (``settles``)."""


@dataclass
class Context:
    settings: Settings
    metrics: Metrics = field(default_factory=Metrics)
    kube: Kube | None = None
    server: web.AppRunner | None = None
    locks: dict[str, threading.Lock] = field(default_factory=dict)
    job_states: JobStates = field(default_factory=JobStates)
    """The last state of each Job, to skip the Job events that change nothing the operator reads."""
    rank0: Rank0Addresses = field(default_factory=Rank0Addresses)
    """Where the progress polls find each running attempt's rank 0."""
    schedule: Schedule = field(init=False)
    """Every TrainingJob seen, for the periodic work (resync, progress polls, TTL) in ``background``."""
    export_schedule: Schedule = field(init=False)
    """Every ExportJob seen, for resyncs (a source that never appears) and to wake those waiting on a source."""
    background: Background | None = None
    watched: dict[tuple[str, str], Obj] = field(default_factory=dict)
    """The latest body of every TrainingJob from its watch (without managedFields), by (namespace, name): filed on
    the watch's thread before the reconcile it queues, where the schedule's copy waits for the event loop."""
    generations: Generations = field(default_factory=Generations)
    """Which TrainingJob generations this process reconciled: what decides whether a TrainingJob event needs one."""
    executor: Executor | None = None
    """kopf's thread pool for blocking handlers (Settings.workers threads), set at start-up."""
    watches: Watches | None = None
    """The watches of TrainingJobs and their Jobs, ConfigMaps and Services (``watches``), started and stopped with
    kopf."""
    work: WorkQueue | None = None
    """Where the watches' events queue their reconciles and repairs."""
    held: dict[tuple[str, str], Held] = field(default_factory=dict)
    """New TrainingJobs' first statuses, decided and not written yet (``held_due``), by (namespace, name)."""
    last_creation: float = 0.0
    """When the watch last saw a new TrainingJob (monotonic s)."""
    _credentials: creds.Credentials | None = None
    _credentials_lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.schedule = Schedule(self.settings.resync_interval_s, self.settings.progress_interval_s)
        self.export_schedule = Schedule(self.settings.resync_interval_s, None)

    def credentials(self) -> creds.Credentials:
        """Loaded once for the process and shared by kopf's login and Kube: an exec plugin runs once, not per
        client. kopf's login (a thread) and the start-up handler (the event loop) may ask at the same time."""
        with self._credentials_lock:
            if self._credentials is None:
                self._credentials = creds.load()
            return self._credentials

    def as_decided(self, body: Obj) -> Obj:
        """``body`` with its held first status when that was decided from this very version (``held``): what a
        reader of its status (a drift repair) must see, as if it were written."""
        meta = body["metadata"]
        held = self.held.get((meta.get("namespace") or "", meta["name"]))
        return {**body, "status": held.status} if held is not None and held.decided_from(body) else body

    def lock(self, namespace: str, name: str, kind: str = L.TJ_PLURAL) -> threading.Lock:
        return self.locks.setdefault(lock_key(namespace, name, kind), threading.Lock())


def lock_key(namespace: str, name: str, kind: str = L.TJ_PLURAL) -> str:
    return f"{namespace}/{name}" if kind == L.TJ_PLURAL else f"{namespace}/{kind}/{name}"


def retry_later(exc: ApiException | urllib3.exceptions.HTTPError) -> kopf.TemporaryError:
    """An API error, or a request that got no answer (the apiserver restarting, a connection lost twice), as a
    retry RETRY_DELAY_S later: kopf's for its own handlers, ``retrying``'s resync for the watches'."""
    what = f"API error {exc.status}: {exc.reason}" if isinstance(exc, ApiException) else f"connection error: {exc}"
    return kopf.TemporaryError(what, delay=RETRY_DELAY_S)


def run_reconcile(
    ctx: Context,
    kind: str,
    namespace: str,
    name: str,
    *,
    job_body: Obj | None = None,
    unread: Obj | None = None,
    check_pods: bool = False,
    read_fresh: bool = False,
    hold_status: bool = False,
) -> Outcome | None:
    """Reconcile one TrainingJob, serialized per job; count it, emit transition Events.

    The TrainingJob is the watch's latest body (``Context.watched``), as an informer's cache serves a client-go
    controller: a read less per reconcile, at most of them one per Job update. That body may trail the apiserver
    (a status written a moment ago, not yet back through the watch), and reconciling a stale body would post every
    transition Event again and write the older status back over the newer one. So its status is written only over
    that very version, and a decision from it that would act on a Job is not carried out (``reconcile.Stale``):
    either way the TrainingJob is read and reconciled again. ``unread`` is the body of a TrainingJob's first event
    that has no status yet (``Generations.unreconciled``): nothing can be newer in what a reconcile reads, so its
    decision is carried out, and its status too is written only over that version (the first pass's creates are
    adopted when it goes again). ``read_fresh``: read it, whatever the watch has (a resync, the net for what a
    watch missed).

    ``hold_status``: with ``unread``, and a queue to write it later, the first status is held back
    (``Context.held``, ``held_due``) and so are its Events. A reconcile that starts from that same
    version of the TrainingJob decides from the held status and writes both; one that starts from a later
    version (something wrote it meanwhile) drops it and decides from what is stored, as after a 409.
    """
    assert ctx.kube is not None
    started, result = time.perf_counter(), "error"
    try:
        with ctx.lock(namespace, name):
            watched = None if unread is not None or read_fresh else ctx.watched.get((namespace, name))
            was_read = unread is None and watched is None
            body = unread or watched or ctx.kube.get_trainingjob(namespace, name)
            held = ctx.held.pop((namespace, name), None)
            if body is None or body["metadata"].get("deletionTimestamp"):
                result = "gone"
                return None
            held = held if held is not None and held.decided_from(body) else None
            # A pass that carries a held status writes it: holding it again would tell its Events unwritten.
            hold = hold_status and unread is not None and ctx.work is not None and held is None
            try:
                outcome = reconcile(ctx.kube, ctx.settings, body, job_body=job_body, unread=unread is not None,
                                    watched=watched is not None, check_pods=check_pods, defer_status=hold,
                                    held=None if held is None else held.status)  # fmt: skip
            except (ApiException, Stale) as exc:
                if was_read or not (isinstance(exc, Stale) or is_status(exc, 409)):
                    raise
                body = ctx.kube.get_trainingjob(namespace, name)
                if body is None or body["metadata"].get("deletionTimestamp"):
                    result = "gone"
                    return None
                held = held if held is not None and held.decided_from(body) else None
                outcome = reconcile(ctx.kube, ctx.settings, body, job_body=job_body, check_pods=check_pods,
                                    held=None if held is None else held.status)  # fmt: skip
            if outcome.deferred is not None:
                ctx.held[(namespace, name)] = Held(body, outcome, time.monotonic())
        ctx.generations.reconciled(body)
        ctx.schedule.reconciled(namespace, name, time.monotonic())
        result = "ok"
    except (ApiException, urllib3.exceptions.HTTPError) as exc:
        raise retry_later(exc) from exc
    finally:
        ctx.metrics.reconciles.labels(kind, result).inc()
        ctx.metrics.duration.labels(kind).observe(time.perf_counter() - started)
    if held is not None:  # written with this pass's status
        _report(ctx, held.body, held.outcome)
    if outcome.deferred is None:
        _report(ctx, body, outcome)
    return outcome


def write_held_status(ctx: Context, namespace: str, name: str) -> None:
    """Write a new TrainingJob's held first status (``run_reconcile(hold_status=True)``), then its Events, unless
    a reconcile carried it meanwhile. A 409 (the TrainingJob was written since) sends it to a fresh reconcile."""
    assert ctx.kube is not None
    with ctx.lock(namespace, name):
        held = ctx.held.pop((namespace, name), None)
        if held is None or held.outcome.deferred is None:
            return
        try:
            held.outcome.deferred(ctx.kube)
        except ApiException as exc:
            if is_status(exc, 404):
                return
            if not is_status(exc, 409):
                raise retry_later(exc) from exc
            held = None
        except urllib3.exceptions.HTTPError as exc:  # the retry's resync decides it again from what is stored
            raise retry_later(exc) from exc
    if held is None:
        run_reconcile(ctx, "trainingjob", namespace, name, read_fresh=True)
        return
    _report(ctx, held.body, held.outcome)


def write_all_held(ctx: Context) -> None:
    """At a clean stop: write every held first status now, or the next operator would have to decide it again."""
    for namespace, name in list(ctx.held):
        try:
            write_held_status(ctx, namespace, name)
        except (kopf.TemporaryError, ApiException) as exc:
            logging.getLogger(__name__).warning("writing the status of %s/%s failed: %s", namespace, name, exc)


def run_repair(ctx: Context, namespace: str, name: str) -> None:
    """Recreate a deleted child of TrainingJob ``name``, serialized with its reconciles; an Event says so.

    An event is not retried, so a failure is only logged: the attempt's next restart recreates it."""
    assert ctx.kube is not None
    started, result = time.perf_counter(), "error"
    try:
        with ctx.lock(namespace, name):
            body = ctx.kube.get_trainingjob(namespace, name)
            created = [] if body is None else repair_children(ctx.kube, ctx.settings, ctx.as_decided(body))
        result = "ok"
    except ApiException as exc:
        logging.getLogger(__name__).warning("repairing the children of %s/%s failed: %s", namespace, name, exc)
        return
    finally:
        ctx.metrics.reconciles.labels("repair", result).inc()
        ctx.metrics.duration.labels("repair").observe(time.perf_counter() - started)
    if body is not None and created:
        _post_event(ctx, body, "Normal", "ChildRecreated", f"recreated the deleted {' and '.join(created)}")


def run_export_reconcile(
    ctx: Context, kind: str, namespace: str, name: str, *, check_pods: bool = False
) -> ExportOutcome | None:
    """Reconcile one ExportJob, read fresh and serialized per ExportJob; count it, emit transition Events."""
    assert ctx.kube is not None
    started, result = time.perf_counter(), "error"
    try:
        with ctx.lock(namespace, name, L.EJ_PLURAL):
            body = ctx.kube.get_exportjob(namespace, name)
            if body is None or body["metadata"].get("deletionTimestamp"):
                result = "gone"
                return None
            outcome = reconcile_export(ctx.kube, ctx.settings, body, check_pods=check_pods)
        result = "ok"
    except (ApiException, urllib3.exceptions.HTTPError) as exc:
        raise retry_later(exc) from exc
    finally:
        ctx.metrics.reconciles.labels(kind, result).inc()
        ctx.metrics.duration.labels(kind).observe(time.perf_counter() - started)
    _post_events(ctx, body, outcome.decision.transitions)
    return outcome


IMPLIED_ENDS = frozenset({ConditionType.RUNNING, ConditionType.RESTARTING, ConditionType.QUEUED})
"""Conditions whose turning False is the other side of another one turning True in the same pass (Running ends as
Succeeded, Failed, Restarting or Suspended begins; Restarting and Queued end as Running begins)."""


def told(transitions: tuple[Transition, ...]) -> tuple[Transition, ...]:
    """The transitions an Event tells: all but an implied end (``IMPLIED_ENDS``) beside a condition turning True,
    whose Event says the same. A second Event would repeat it, at a write per job on a busy apiserver."""
    if not any(t.status == "True" for t in transitions):
        return transitions
    return tuple(t for t in transitions if t.status == "True" or t.type not in IMPLIED_ENDS)


def _post_events(ctx: Context, body: Obj, transitions: tuple[Transition, ...]) -> None:
    for t in told(transitions):
        _post_event(
            ctx, body, "Warning" if t.warning else "Normal", t.reason, f"{t.type.value}={t.status}: {t.message}"
        )


def _post_event(ctx: Context, body: Obj, type: str, reason: str, message: str) -> None:
    """An Event lost to an API error is only logged: the status it tells is written already."""
    assert ctx.kube is not None
    try:
        ctx.kube.post_event(body, type, reason, message)
    except (ApiException, urllib3.exceptions.HTTPError) as exc:
        meta = body["metadata"]
        logging.getLogger(__name__).warning("posting the %s Event of %s/%s failed: %s", reason, meta["namespace"],
                                            meta["name"], exc)  # fmt: skip


def _report(ctx: Context, body: Obj, outcome: Outcome) -> None:
    counters = {
        ConditionType.CREATED: ctx.metrics.created,
        ConditionType.SUCCEEDED: ctx.metrics.succeeded,
        ConditionType.FAILED: ctx.metrics.failed,
    }
    _post_events(ctx, body, outcome.decision.transitions)
    for t in outcome.decision.transitions:
        if t.status == "True" and t.type in counters:
            counters[t.type].inc()
    restarts = outcome.decision.status.restarts - outcome.before.restarts
    if restarts > 0:
        ctx.metrics.restarted.inc(restarts)


def build_registry(settings: Settings, ctx: Context | None = None) -> tuple[kopf.OperatorRegistry, Context]:
    ctx = ctx or Context(settings=settings)
    registry = kopf.OperatorRegistry()
    on = kopf.on

    @on.login(id="login", registry=registry)
    def login(settings: kopf.OperatorSettings, **_: Any) -> kopf.ConnectionInfo:
        # Kube's own credentials, so both authenticate identically.
        try:
            return ctx.credentials().connection_info(settings.networking.trust_env)
        except creds.CredentialsError as exc:
            raise kopf.LoginError(str(exc)) from exc

    @on.startup(id="configure", registry=registry)
    async def configure(settings: kopf.OperatorSettings, logger: kopf.Logger, **_: Any) -> None:
        apply_kopf_settings(settings, ctx.settings)
        if ctx.server is None:  # the runner starts it before the leader election, so a standby answers probes
            ctx.server = await start_server(ctx.metrics, ctx.settings.metrics_port)
        start_reconciling(ctx, settings.execution.executor)
        ctx.metrics.ready.set()
        logger.info("kiln operator ready; metrics on :%d", ctx.settings.metrics_port)

    @on.cleanup(id="shutdown", registry=registry)
    async def shutdown(**_: Any) -> None:
        ctx.metrics.ready.clear()
        if ctx.background is not None:
            await ctx.background.stop()
        if ctx.watches is not None:
            await asyncio.to_thread(ctx.watches.stop)
        if ctx.work is not None:
            ctx.work.close()
        await asyncio.to_thread(write_all_held, ctx)
        if ctx.server is not None:
            await ctx.server.cleanup()

    @on.resume(*EJ, id="reconcile-export", registry=registry)
    @on.create(*EJ, id="reconcile-export", registry=registry)
    def on_exportjob_create(namespace: str | None, name: str, **_: Any) -> None:
        outcome = run_export_reconcile(ctx, "exportjob", namespace or "", name)
        if outcome is not None and outcome.decision.invalid:
            raise kopf.PermanentError("invalid spec; see the Failed condition")

    @on.event(*EJ, id="track-export", registry=registry)
    async def track_export(type: str, body: kopf.Body, namespace: str | None, name: str, **_: Any) -> None:
        deleted = type == "DELETED"
        ctx.export_schedule.observe(namespace or "", name, None if deleted else dict(body), time.monotonic())
        if deleted:
            ctx.locks.pop(lock_key(namespace or "", name, L.EJ_PLURAL), None)

    return registry, ctx


def start_reconciling(ctx: Context, executor: Executor) -> None:
    """On the event loop: the API client, the periodic work, the work queue on ``executor`` and the watches that
    feed it; everything of the operator but kopf's own part (ExportJobs' handlers, login, the loop's lifetime)."""
    ctx.kube = Kube(load_api_client(ctx.settings.workers * 3, ctx.credentials()), fanout=ctx.settings.workers * 2)
    ctx.background = Background((ctx.schedule, _periodic_actions(ctx)), (ctx.export_schedule, _export_actions(ctx)))
    ctx.executor = executor
    ctx.background.start(executor)
    ctx.work = WorkQueue(executor, ctx.settings.workers)
    ctx.watches = Watches(ctx.kube, ctx.settings.namespaces, _watch_handlers(ctx, ctx.work, asyncio.get_running_loop()))
    ctx.watches.start()


def settles(job: Obj) -> bool:
    """Whether a Job update turns a condition of its owner's status (so it is reconciled without waiting): the Job
    ended, is suspended, or has all its workers ready (or done)."""
    view = job_view(job)
    parallelism = int((job.get("spec") or {}).get("parallelism") or 1)
    return view.finished or view.suspended or view.ready + view.succeeded >= parallelism


def _track(ctx: Context, type: str, body: Obj) -> None:
    """Record a TrainingJob's event for the periodic work; on the event loop, where Background reads the schedules,
    so they need no lock."""
    meta = body["metadata"]
    namespace, name, uid, deleted = meta.get("namespace") or "", meta["name"], meta.get("uid"), type == "DELETED"
    phase = None if deleted else (body.get("status") or {}).get("phase", Phase.PENDING.value)
    seen = ctx.schedule.entries.get((namespace, name))
    if seen is None or seen.phase != phase:  # created, deleted or moved on: re-check the exports waiting on it
        ctx.export_schedule.wake(namespace, lambda export: waits_for(export, name))
    ctx.metrics.observe_trainingjob(uid, namespace, name, None if deleted else body)
    ctx.schedule.observe(namespace, name, None if deleted else body, time.monotonic())
    if deleted or phase in TERMINAL:
        ctx.rank0.forget(namespace, name)
    if deleted:
        ctx.locks.pop(lock_key(namespace, name), None)
        ctx.generations.forget(uid)


def _watch_handlers(ctx: Context, queue: WorkQueue, loop: asyncio.AbstractEventLoop) -> dict[Kind, Handler]:
    """What the watches do with an event, on their threads: filter it, then queue the reconcile or repair it calls
    for. Most TrainingJob events are the operator's own status writes (``Generations``) and most Job events change
    nothing a status reflects (``JobStates``): those go no further."""

    def retrying(namespace: str, name: str, work: Callable[[], object], schedule: Schedule = ctx.schedule) -> None:
        try:
            work()
        except kopf.TemporaryError as exc:  # an API or connection error: the schedule retries it
            logging.getLogger(__name__).warning("reconciling %s/%s failed, retrying in %.0f s: %s",
                                                namespace, name, RETRY_DELAY_S, exc)  # fmt: skip
            loop.call_soon_threadsafe(schedule.resync_soon, namespace, name, time.monotonic() + RETRY_DELAY_S)

    def write_when_due(namespace: str, name: str) -> None:
        """On the event loop: queue the write of a held first status once ``held_due``, unless a reconcile
        carried it meanwhile."""
        held = ctx.held.get((namespace, name))
        if held is None:
            return
        wait = held_due(held.since, ctx.last_creation) - time.monotonic()
        if wait > 0:
            loop.call_later(wait, write_when_due, namespace, name)
            return
        write = functools.partial(write_held_status, ctx, namespace, name)
        queue.submit(("held-status", namespace, name), functools.partial(retrying, namespace, name, write))

    def on_trainingjob(type: str, body: Obj) -> None:
        body = without_managed_fields(body)
        meta = body["metadata"]
        namespace, name = meta.get("namespace") or "", meta["name"]
        if type == "DELETED":
            ctx.watched.pop((namespace, name), None)
        else:
            ctx.watched[(namespace, name)] = body
        loop.call_soon_threadsafe(_track, ctx, type, body)  # first, so a retry below finds the job scheduled
        if type == "DELETED" or not ctx.generations.wanted(body):
            return
        unread = ctx.generations.unreconciled(body)
        if unread is not None:
            ctx.last_creation = time.monotonic()

        def reconcile_if_still_wanted() -> None:
            # Asked again when it starts: a run for this job in progress at submit time (its own status write
            # came back as this event) may have reconciled this generation meanwhile.
            if not ctx.generations.wanted(body):
                return
            retrying(namespace, name, functools.partial(run_reconcile, ctx, "trainingjob", namespace, name,
                                                        unread=unread, hold_status=True))  # fmt: skip
            if (namespace, name) in ctx.held:
                loop.call_soon_threadsafe(write_when_due, namespace, name)

        # A new TrainingJob (no status yet) goes first: its Job is what its user waits for (``WorkQueue``).
        queue.submit(("trainingjob", namespace, name), reconcile_if_still_wanted, urgent=unread is not None)

    def on_job(type: str, job: Obj) -> None:
        namespace, labels = job["metadata"].get("namespace") or "", job["metadata"].get("labels") or {}
        owner = labels.get(L.TRAINING_JOB) or labels.get(L.EXPORT_JOB)
        if owner is None or not ctx.job_states.changed(namespace, job, type):
            return
        after_s = 0.0 if type == "DELETED" or settles(job) else JOB_PROGRESS_BATCH_S
        if L.TRAINING_JOB in labels:
            job_body = None if type == "DELETED" else job
            work = functools.partial(run_reconcile, ctx, "job", namespace, owner, job_body=job_body)
            queue.submit(("job", namespace, owner), functools.partial(retrying, namespace, owner, work), after_s)
        else:
            export = functools.partial(run_export_reconcile, ctx, "export-job", namespace, owner)
            retried = functools.partial(retrying, namespace, owner, export, ctx.export_schedule)
            queue.submit(("export-job", namespace, owner), retried, after_s)

    def on_child(type: str, child: Obj) -> None:
        namespace, labels = child["metadata"].get("namespace") or "", child["metadata"].get("labels") or {}
        if type == "DELETED" and L.TRAINING_JOB in labels:  # drift: recreate it now, not with the next attempt
            owner = labels[L.TRAINING_JOB]
            queue.submit(("repair", namespace, owner), functools.partial(run_repair, ctx, namespace, owner))

    return {TRAININGJOBS: on_trainingjob, JOBS: on_job, CONFIGMAPS: on_child, SERVICES: on_child}


def _periodic_actions(ctx: Context) -> dict[str, Any]:
    """What Background runs when due: each takes (namespace, name, latest body) and may block."""

    def resync(namespace: str, name: str, _: Obj) -> None:
        # The resync also asks why pods wait: a stuck pod sends no Job event to trigger a reconcile.
        run_reconcile(ctx, "resync", namespace, name, check_pods=True, read_fresh=True)

    def progress(namespace: str, name: str, body: Obj) -> None:
        assert ctx.kube is not None
        try:
            poll_progress(ctx.kube, body, ctx.settings.progress_timeout_s, ctx.rank0)
        except OSError as exc:  # a busy or restarting rank 0: skip this poll
            logging.getLogger(__name__).debug("progress poll of %s/%s failed: %s", namespace, name, exc)

    def expire(namespace: str, name: str, _: Obj) -> None:
        assert ctx.kube is not None
        ctx.kube.delete_trainingjob(namespace, name)

    return {"resync": resync, "progress": progress, "expire": expire}


def _export_actions(ctx: Context) -> dict[str, Any]:
    def resync(namespace: str, name: str, _: Obj) -> None:
        run_export_reconcile(ctx, "export-resync", namespace, name, check_pods=True)  # see _periodic_actions

    return {"resync": resync}
