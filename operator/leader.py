"""Leader election over a coordination.k8s.io/v1 Lease: only the replica holding it runs kopf and reconciles.

Why not kopf's peering: peering pauses an operator when it sees a peer of *higher* priority, and freezes all of
them when two share a priority (so two replicas of one Deployment would both stop), and a peer notices another
only after the other announced itself: nothing stops both from handling the same event meanwhile. A Lease,
updated with optimistic concurrency (resourceVersion), gives one holder at a time.

The rules are client-go's (k8s.io/client-go/tools/leaderelection):

- a standby takes the Lease over once it has seen the same record, unrenewed, for ``leaseDurationSeconds``
  on its *own* clock (``Sighting``), so clock skew between nodes never shortens a lease;
- the leader renews every retry period, and exits once it has gone ``renew_deadline_s`` without a successful
  renewal: before any standby can take over, since the deadline is shorter than the lease;
- a leader stopping cleanly releases the Lease (empty holder), so a standby takes over at its next try.

``sight``, ``decide``, ``claimed`` and ``released`` are pure; ``LeaderElector`` does the API calls, and ``serve``
runs it in a process of its own (``hold_lease``, forked by the runner before it starts any thread). A separate
process because a renewal in the operator's own would compete for the GIL with a burst of reconciles in 48
handler threads: on a busy machine that stalled a renewal past its deadline (and so cost a needless takeover).
Forked, not spawned: it shares the operator's imports and logging instead of importing them again.

The lease process talks to the operator over two pipes, one word a line:

- it writes ``standby <holder>`` once while it waits, then ``leader`` once it holds the Lease;
- on reading ``release`` it gives the Lease up and exits 0; on reading end-of-file (the operator died, and
  with it the pipe's other end) it exits without renewing, so the Lease expires;
- on losing the Lease it SIGKILLs the operator at once, without relying on the operator's event loop (which a
  burst may stall), then exits 1: only the new leader may reconcile from then on.
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

from kubernetes.client.rest import ApiException

from kiln.operator.kube import Kube, is_status

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

    def __init__(self, kube: Kube, namespace: str, name: str, identity: str, lease_duration_s: float) -> None:
        self.kube, self.namespace, self.name, self.identity = kube, namespace, name, identity
        self.lease_duration_s = lease_duration_s
        self.sighting: Sighting | None = None
        self.renewed_at = 0.0
        """Monotonic time just before the last successful acquire or renew."""

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
        started = time.monotonic()
        lease = self._read()
        self.sighting = sight(self.sighting, lease, started)
        action = decide(lease, self.sighting, self.identity, started)
        if action is Action.STANDBY:
            return False
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
                return None
            raise
        if action is Action.ACQUIRE:
            log.info("acquired Lease %s/%s as %s", self.namespace, self.name, self.identity)
        self.renewed_at = started
        return True

    def release(self) -> None:
        """Give the Lease up if this replica still holds it (a clean stop); errors only delay the takeover."""
        try:
            lease = self._read()
            if lease is not None and _record(lease)[0] == self.identity:
                self.kube.request("PUT", self._path(self.name), released(lease, datetime.now(UTC)))
                log.info("released Lease %s/%s", self.namespace, self.name)
        except (ApiException, OSError) as exc:
            log.warning("releasing Lease %s/%s failed; a standby takes over when it expires: %s", self.namespace,
                        self.name, exc)  # fmt: skip


def serve(
    elector: LeaderElector,
    renew_deadline_s: float,
    retry_period_s: float,
    say: Callable[[str], None],
    next_command: Callable[[float], str | None],
) -> bool:
    """Stand by, acquire, then renew every retry period until told to stop (True) or the Lease is lost (False).

    ``next_command(timeout)`` waits that long for a line from the operator: None when none came, "" at
    end-of-file. A renewal is lost when another replica holds the Lease or none succeeded for renew_deadline_s.
    """
    leading, standing_by = False, False
    while True:
        if leading:  # a hung request must not outlast the deadline
            elector.kube.timeout_s = max(0.5, elector.renewed_at + renew_deadline_s - time.monotonic())
        try:
            held: bool | None = elector.try_once()
        except Exception as exc:  # API, network, urllib3's MaxRetryError: one missed round; the deadline decides
            log.warning("reading or writing Lease %s/%s failed: %r", elector.namespace, elector.name, exc)
            held = None
        if held and not leading:
            leading = True
            say("leader")
        elif held is False and leading:
            log.error("Lease %s/%s is held by %r now", elector.namespace, elector.name, elector.sighting)
            return False
        elif held is False and not standing_by and elector.sighting is not None:
            standing_by = True
            say(f"standby {elector.sighting.record[0]}")
        if leading and time.monotonic() - elector.renewed_at > renew_deadline_s:
            log.error("no renewal of Lease %s/%s for %.1f s", elector.namespace, elector.name, renew_deadline_s)
            return False
        command = next_command(retry_period_s)
        if command is not None:  # "release", or end-of-file: the operator is gone
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

    if serve(elector, renew_deadline_s, retry_period_s, say, next_command):
        return 0
    # Stop the operator now, whatever its event loop is doing: a standby may take over once the Lease expires.
    log.error("lost the leader Lease; stopping the operator (pid %d) so that only the new leader reconciles",
              operator_pid)  # fmt: skip
    if os.getppid() == operator_pid:  # not reparented: the operator still runs
        os.kill(operator_pid, signal.SIGKILL)
    return 1
