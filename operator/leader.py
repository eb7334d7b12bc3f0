"""Leader election over a coordination.k8s.io/v1 Lease: only the replica holding it runs kopf and reconciles.

Why not kopf's peering: peering pauses an operator when it sees a peer of *higher* priority, and freezes all of
them when two share a priority (so two replicas of one Deployment would both stop), and a peer notices another
only after the other announced itself: nothing stops both from handling the same event meanwhile. A Lease,
updated with optimistic concurrency (resourceVersion), gives one holder at a time.

The rules are client-go's (k8s.io/client-go/tools/leaderelection):

- a standby takes the Lease over once it has seen the same record, unrenewed, for ``leaseDurationSeconds``
  on its *own* clock (``Sighting``), so clock skew between nodes never shortens a lease;
- the leader renews every retry period; a leader stopping cleanly releases the Lease (empty holder), so a
  standby takes over at its next try.

Unlike client-go, a leader that has gone ``renew_deadline_s`` without a successful renewal (an apiserver outage)
is paused, not ended: its lease process SIGSTOPs the operator, which the kernel enforces at once, whatever the
operator's event loop is doing (as strong a fence as SIGKILL, but reversible), and goes on trying. It resumes the
operator (SIGCONT) once a renewal succeeds on a Lease that still names this replica with the ``leaseTransitions``
of its last renewal (``still_ours``); a Lease that names another holder, was released or deleted, or counts
another transition was lost meanwhile, and the stopped operator is SIGKILLed. Why at most one replica reconciles:
a standby acquires only after seeing the record unchanged for ``leaseDurationSeconds`` on its own clock, and the
leader is frozen from ``renew_deadline_s`` on, which is shorter; a renewal is a compare-and-swap (the read's
resourceVersion), and every takeover counts a transition (``claimed``), so one that succeeds with holder and
transitions unchanged proves that nobody held the Lease in between. The container's liveness probe (/healthz,
answered by the frozen operator) bounds the pause: a longer outage restarts the container, which takes its own
Lease back at once (the same identity).

``sight``, ``decide``, ``still_ours``, ``claimed`` and ``released`` are pure; ``LeaderElector`` does the API
calls, and ``serve`` runs it in a process of its own (``hold_lease``, forked by the runner before it starts any
thread). A separate process because a renewal in the operator's own would compete for the GIL with a burst of
reconciles in 48 handler threads: on a busy machine that stalled a renewal past its deadline.
Forked, not spawned: it shares the operator's imports and logging instead of importing them again.

The lease process talks to the operator over two pipes, one word a line:

- it writes ``standby <holder>`` once while it waits, then ``leader`` once it holds the Lease;
- on reading ``release`` it gives the Lease up and exits 0; on reading end-of-file (the operator died, and
  with it the pipe's other end) it exits without renewing, so the Lease expires;
- on losing the Lease it SIGKILLs the operator at once, without relying on the operator's event loop (which a
  burst may stall), then exits 1: only the new leader may reconcile from then on.

The operator must not be its PID namespace's init (a container's PID 1): the kernel drops SIGSTOP and SIGKILL sent
to it from inside the namespace, so the runner forks the operator off a minimal init there.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import urllib3

from kiln.operator.kube import ApiException, Kube, is_status

Obj = dict[str, Any]
LEASE_API_VERSION, LEASE_KIND = "coordination.k8s.io/v1", "Lease"
log = logging.getLogger("kiln.operator.leader")  # its own name also when it runs as __main__


class Action(StrEnum):
    ACQUIRE = "acquire"
    """Create the Lease, or take over a released or expired one."""
    RENEW = "renew"
    """This replica holds it: renew it."""
    STANDBY = "standby"
    """Another replica holds a live Lease: wait."""


@dataclass(frozen=True)
class Sighting:
    """A Lease record as this replica last saw it, and when it first saw it so (monotonic seconds)."""

    record: tuple[str, str, int]
    """(holder, renewTime, leaseTransitions): any change means the holder is alive."""
    at: float


def _spec(lease: Obj | None) -> Obj:
    return (lease or {}).get("spec") or {}


def _record(lease: Obj | None) -> tuple[str, str, int]:
    spec = _spec(lease)
    return (
        str(spec.get("holderIdentity") or ""),
        str(spec.get("renewTime") or ""),
        int(spec.get("leaseTransitions") or 0),
    )


def sight(previous: Sighting | None, lease: Obj | None, now: float) -> Sighting:
    """The new sighting after reading ``lease`` at ``now``: the clock restarts whenever the record changed."""
    record = _record(lease)
    if previous is not None and previous.record == record:
        return previous
    return Sighting(record=record, at=now)


def decide(lease: Obj | None, sighting: Sighting, identity: str, now: float) -> Action:
    """What to do about ``lease`` (None: it does not exist), seen as ``sighting``, at monotonic ``now``."""
    if lease is None:
        return Action.ACQUIRE
    holder = sighting.record[0]
    if holder == identity:
        return Action.RENEW
    if not holder:
        return Action.ACQUIRE  # released by a leader that stopped cleanly
    duration = float(_spec(lease).get("leaseDurationSeconds") or 0)
    return Action.ACQUIRE if now - sighting.at >= duration else Action.STANDBY


def still_ours(lease: Obj | None, identity: str, transitions: int) -> bool:
    """Whether a leader paused since its last renewal, which left ``transitions``, may renew ``lease`` and resume:
    only if it still names this replica and nobody took it over meanwhile (every takeover counts a transition,
    see ``claimed``). Released or deleted, it is lost: a standby may have held it since."""
    holder, _, seen = _record(lease)
    return lease is not None and holder == identity and seen == transitions


def micro_time(wall: datetime) -> str:
    """A Lease's MicroTime: RFC 3339 with microseconds."""
    return wall.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def claimed(lease: Obj | None, identity: str, wall: datetime, duration_s: float, *, namespace: str, name: str) -> Obj:
    """The Lease body that acquires or renews ``lease`` for ``identity`` (carrying its resourceVersion, so a
    concurrent writer makes the update fail with 409 instead of both winning)."""
    spec = _spec(lease)
    takeover = spec.get("holderIdentity") != identity
    metadata: Obj = {"name": name, "namespace": namespace}
    if lease is not None:
        metadata["resourceVersion"] = lease["metadata"]["resourceVersion"]
    now = micro_time(wall)
    transitions = int(spec.get("leaseTransitions") or 0) + (1 if takeover and lease is not None else 0)
    return {
        "apiVersion": LEASE_API_VERSION,
        "kind": LEASE_KIND,
        "metadata": metadata,
        "spec": {
            "holderIdentity": identity,
            "leaseDurationSeconds": max(1, round(duration_s)),
            "acquireTime": now if takeover else spec.get("acquireTime", now),
            "renewTime": now,
            "leaseTransitions": transitions,
        },
    }


def released(lease: Obj, wall: datetime) -> Obj:
    """``lease`` given up: no holder, so a standby acquires it at its next try instead of waiting it out."""
    body = {**lease, "spec": {**_spec(lease), "holderIdentity": "", "leaseDurationSeconds": 1}}
    body["spec"]["renewTime"] = micro_time(wall)
    return body


class LeaderElector:
    """One replica's view of one Lease: reads it, acquires or renews it when due, releases it."""

    def __init__(
        self, kube: Kube, namespace: str, name: str, identity: str, lease_duration_s: float, *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:  # fmt: skip
        self.kube, self.namespace, self.name, self.identity = kube, namespace, name, identity
        self.lease_duration_s, self.clock = lease_duration_s, clock
        self.sighting: Sighting | None = None
        self.renewed_at = 0.0
        """``clock()`` just before the last successful acquire or renew."""
        self.transitions = 0
        """The Lease's leaseTransitions as the last successful acquire or renew left it."""

    def _path(self, name: str | None = None) -> str:
        base = f"/apis/coordination.k8s.io/v1/namespaces/{self.namespace}/leases"
        return f"{base}/{name}" if name else base

    def _read(self) -> Obj | None:
        try:
            return self.kube.request("GET", self._path(self.name))
        except ApiException as exc:
            if is_status(exc, 404):
                return None
            raise

    def try_once(self) -> bool | None:
        """One round: read the Lease, then acquire or renew it if due. True while this replica holds it, False
        while another does, None when the write conflicted (the next round's read tells which)."""
        started = self.clock()
        lease = self._read()
        self.sighting = sight(self.sighting, lease, started)
        action = decide(lease, self.sighting, self.identity, started)
        if action is Action.STANDBY:
            return False
        if not self._claim(lease, started):
            return None
        if action is Action.ACQUIRE:
            log.info("acquired Lease %s/%s as %s", self.namespace, self.name, self.identity)
        return True

    def try_renewing_paused(self) -> bool | None:
        """One round of a leader whose operator is paused: renew the Lease only if it is ``still_ours``. True once
        renewed, False when it was lost meanwhile, None when the write conflicted (the next round's read tells)."""
        started = self.clock()
        lease = self._read()
        self.sighting = sight(self.sighting, lease, started)
        if not still_ours(lease, self.identity, self.transitions):
            return False
        return True if self._claim(lease, started) else None

    def _claim(self, lease: Obj | None, started: float) -> bool:
        """Acquire or renew ``lease`` (None: create it), read at ``started``; False on a conflicting write."""
        body = claimed(
            lease, self.identity, datetime.now(UTC), self.lease_duration_s, namespace=self.namespace, name=self.name
        )
        try:
            if lease is None:
                self.kube.request("POST", self._path(), body)
            else:
                self.kube.request("PUT", self._path(self.name), body)
        except ApiException as exc:
            # Another replica wrote it first, or our own earlier try did (the client retries a PUT whose answer
            # timed out, and the retry carries a stale resourceVersion): not a loss by itself.
            if is_status(exc, 409):
                return False
            raise
        self.renewed_at, self.transitions = started, body["spec"]["leaseTransitions"]
        return True

    def release(self) -> None:
        """Give the Lease up if this replica still holds it (a clean stop); errors only delay the takeover."""
        try:
            lease = self._read()
            if lease is not None and _record(lease)[0] == self.identity:
                self.kube.request("PUT", self._path(self.name), released(lease, datetime.now(UTC)))
                log.info("released Lease %s/%s", self.namespace, self.name)
        except (ApiException, OSError, urllib3.exceptions.HTTPError) as exc:  # MaxRetryError is no OSError
            log.warning("releasing Lease %s/%s failed; a standby takes over when it expires: %s", self.namespace,
                        self.name, exc)  # fmt: skip


def serve(
    elector: LeaderElector,
    renew_deadline_s: float,
    retry_period_s: float,
    say: Callable[[str], None],
    next_command: Callable[[float], str | None],
    *,
    pause: Callable[[], None],
    resume: Callable[[], None],
) -> bool:
    """Stand by, acquire, then renew every retry period until told to stop (True) or the Lease is lost (False).

    ``next_command(timeout)`` waits that long for a line from the operator: None when none came, "" at
    end-of-file. After renew_deadline_s without a successful renewal, ``pause()`` the operator; ``resume()`` it
    once a renewal of a Lease that is ``still_ours`` succeeds. Lost: another replica holds the Lease, or it was
    released, deleted or taken over while the operator was paused; the caller then ends the operator.
    """
    leading, standing_by = False, False
    paused_at: float | None = None
    """``elector.clock()`` when the operator was paused, while it is."""
    failure = "none yet"
    while True:
        if paused_at is not None:  # nothing to race but the next round: give a slow, recovering apiserver time
            elector.kube.timeout_s = renew_deadline_s
        elif leading:  # a hung request must not outlast the deadline
            elector.kube.timeout_s = max(0.5, elector.renewed_at + renew_deadline_s - elector.clock())
        try:
            held: bool | None = elector.try_renewing_paused() if paused_at is not None else elector.try_once()
            if held is None:
                failure = "a conflicting write"
        except Exception as exc:  # API, network, urllib3's MaxRetryError: one missed round; the deadline decides
            if paused_at is None:  # while paused, said once when pausing and once when it ends
                log.warning("reading or writing Lease %s/%s failed: %r", elector.namespace, elector.name, exc)
            held, failure = None, repr(exc)
        if paused_at is not None and held:
            resume()
            log.warning("renewed Lease %s/%s; resumed the operator after %.1f s paused", elector.namespace,
                        elector.name, elector.clock() - paused_at)  # fmt: skip
            paused_at = None
        elif held is False and leading:
            log.error("Lease %s/%s is held by %r now (leaseTransitions %d at this replica's last renewal)",
                      elector.namespace, elector.name, elector.sighting, elector.transitions)  # fmt: skip
            return False
        elif held and not leading:
            leading = True
            say("leader")
        elif held is False and not standing_by and elector.sighting is not None:
            standing_by = True
            say(f"standby {elector.sighting.record[0]}")
        if leading and paused_at is None and elector.clock() - elector.renewed_at > renew_deadline_s:
            log.error("no renewal of Lease %s/%s for %.1f s (last failure: %s); pausing the operator until a "
                      "renewal succeeds", elector.namespace, elector.name, renew_deadline_s, failure)  # fmt: skip
            pause()
            paused_at = elector.clock()
        command = next_command(retry_period_s)
        if command is not None:  # "release", or end-of-file: the operator is gone
            if paused_at is not None:  # it wrote that just before the pause: it may still run handlers
                log.warning("the operator stopped while paused; ending it instead of resuming it")
                return False
            if command == "release" and leading:
                elector.release()
            return True


def hold_lease(
    elector: LeaderElector, *, renew_deadline_s: float, retry_period_s: float, commands: int, events: int,
    operator_pid: int,
) -> int:  # fmt: skip
    """The lease process's body (forked by the runner): serve over the pipes ``commands`` and ``events``
    (file descriptors); exit status 0 after a release or the operator's end, 1 after losing the Lease."""
    # The operator decides when to stop: Ctrl-C in a terminal reaches the whole process group, and this process
    # must then release the Lease after kopf stopped, not die first.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    incoming, outgoing = os.fdopen(commands, "r"), os.fdopen(events, "w")

    def say(line: str) -> None:
        outgoing.write(line + "\n")
        outgoing.flush()

    def next_command(timeout: float) -> str | None:
        ready, _, _ = select.select([incoming], [], [], timeout)
        return incoming.readline().strip() if ready else None

    def signal_operator(signum: int) -> None:
        if os.getppid() == operator_pid:  # not reparented: the operator still runs
            os.kill(operator_pid, signum)

    pause, resume = (lambda: signal_operator(signal.SIGSTOP)), (lambda: signal_operator(signal.SIGCONT))
    if serve(elector, renew_deadline_s, retry_period_s, say, next_command, pause=pause, resume=resume):
        return 0
    # Stop the operator now (a stopped one too), whatever its event loop is doing: a standby may take over.
    log.error("lost the leader Lease; stopping the operator (pid %d) so that only the new leader reconciles",
              operator_pid)  # fmt: skip
    signal_operator(signal.SIGKILL)
    return 1
