"""The lease process's loop (``serve``) through an apiserver outage, on a fake clock: past the renew deadline the
operator is paused, not ended; it is resumed once the Lease is renewed unchanged, and ended if it was lost.

The apiserver is a Lease store in memory that keeps the rules a leader relies on (404 while absent, 409 for a
stale resourceVersion); every other replica writes through ``claimed``, as a real standby does. The last test runs
the PID-1 premise for real: in a PID namespace, the operator must not be init, or the kernel drops the fence.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
import urllib3

from kiln.operator.kube import ApiException
from kiln.operator.leader import LeaderElector, claimed, released, serve, still_ours

IDENTITY, OTHER = "replica-a", "replica-b"
LEASE_S, DEADLINE_S, RETRY_S = 10.0, 8.0, 1.0  # the shipped timings (Settings' defaults)
HORIZON_S = 100.0
"""Every script ends before this; a replica still serving then fails the test (rather than looping forever)."""


class LeaseServer:
    """An apiserver that holds one Lease and can be down."""

    def __init__(self) -> None:
        self.lease: dict[str, Any] | None = None
        self.version, self.down, self.timeout_s = 0, False, DEADLINE_S
        self.before_write: Callable[[], None] | None = None
        """Runs once just before the next write lands (a concurrent writer's)."""

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        if self.down:
            raise ConnectionRefusedError(f"{method} {path}: the apiserver is down")
        if method == "GET":
            if self.lease is None:
                raise ApiException(status=404, reason="Not Found")
            return copy.deepcopy(self.lease)
        if self.before_write is not None:
            concurrent, self.before_write = self.before_write, None
            concurrent()
        assert body is not None
        current = None if self.lease is None else self.lease["metadata"]["resourceVersion"]
        if body["metadata"].get("resourceVersion") != current:  # a POST carries none: 409 unless absent
            raise ApiException(status=409, reason="Conflict")
        return self._store(body)

    def _store(self, body: dict[str, Any]) -> dict[str, Any]:
        self.version += 1
        self.lease = copy.deepcopy(body)
        self.lease["metadata"]["resourceVersion"] = str(self.version)
        return copy.deepcopy(self.lease)

    def holder(self) -> tuple[str, int]:
        spec = (self.lease or {}).get("spec") or {}
        return spec.get("holderIdentity", ""), spec.get("leaseTransitions", 0)

    # What other parties do meanwhile.
    def taken_over(self) -> None:
        self._store(claimed(self.lease, OTHER, datetime.now(UTC), LEASE_S, namespace="kiln-system", name="lease"))

    def taken_over_and_released(self) -> None:
        self.taken_over()
        assert self.lease is not None
        self._store(released(self.lease, datetime.now(UTC)))

    def taken_back_by_a_namesake(self) -> None:
        """Another process with this replica's identity acquired it after a takeover: holder as before, but
        two more transitions."""
        self.taken_over()
        self._store(claimed(self.lease, IDENTITY, datetime.now(UTC), LEASE_S, namespace="kiln-system", name="lease"))

    def deleted(self) -> None:
        self.lease = None


class Replica:
    """One replica's lease process on a fake clock: ``script`` maps a time to what happens then (an outage starts
    or ends, another replica writes, the operator says a command)."""

    def __init__(self, server: LeaseServer, script: dict[float, Callable[[], str | None]]) -> None:
        self.server, self.script, self.now = server, script, 0.0
        self.elector = LeaderElector(server, "kiln-system", "lease", IDENTITY, LEASE_S, clock=lambda: self.now)  # type: ignore[arg-type]
        self.said: list[str] = []
        self.paused: list[float] = []
        self.resumed: list[float] = []

    def next_command(self, timeout: float) -> str | None:
        self.now += timeout
        assert self.now < HORIZON_S, f"still serving at {self.now:g} s (paused {self.paused}, resumed {self.resumed})"
        happening = self.script.get(self.now)
        return happening() if happening else None

    def serve(self) -> bool:
        def pause() -> None:
            self.paused.append(self.now)

        def resume() -> None:
            self.resumed.append(self.now)

        return serve(self.elector, DEADLINE_S, RETRY_S, self.said.append, self.next_command, pause=pause, resume=resume)

    def stops_at(self, when: float) -> None:
        self.script[when] = lambda: "release"


def outage(server: LeaseServer, start: float, end: float, meanwhile: Callable[[], None] | None = None) -> dict:
    def down() -> None:
        server.down = True

    def up() -> None:
        if meanwhile is not None:
            meanwhile()
        server.down = False

    return {start: down, end: up}


def test_an_outage_past_the_renew_deadline_pauses_the_operator_once_and_resumes_it_when_renewed() -> None:
    server = LeaseServer()
    replica = Replica(server, outage(server, start=2.0, end=30.0))
    replica.stops_at(40.0)

    assert replica.serve() is True  # told to stop, not lost
    assert replica.said == ["leader"]
    # Last renewed at 1 (the round after it ran at 2 already failed); paused at the first round past 1 + 8.
    assert replica.paused == [10.0]
    assert replica.resumed == [30.0]  # the first round with the apiserver back
    assert server.holder() == ("", 0)  # renewed as this replica's all along, then released at the stop


def test_renewals_that_resume_in_time_never_pause_the_operator() -> None:
    server = LeaseServer()
    replica = Replica(server, outage(server, start=2.0, end=8.0))
    replica.stops_at(20.0)

    assert replica.serve() is True
    assert replica.paused == [] and replica.resumed == []


@pytest.mark.parametrize(
    "meanwhile",
    [
        LeaseServer.taken_over,
        LeaseServer.taken_over_and_released,
        LeaseServer.taken_back_by_a_namesake,
        LeaseServer.deleted,
    ],
)
def test_a_lease_lost_while_paused_ends_the_operator_without_resuming_it(
    meanwhile: Callable[[LeaseServer], None],
) -> None:
    server = LeaseServer()
    replica = Replica(server, outage(server, start=2.0, end=30.0, meanwhile=lambda: meanwhile(server)))

    assert replica.serve() is False
    assert replica.paused == [10.0] and replica.resumed == []
    assert replica.now == 30.0  # decided at the first round with the apiserver back


def test_a_standby_taking_over_between_our_read_and_our_renewal_wins_and_the_operator_is_ended() -> None:
    server = LeaseServer()
    replica = Replica(server, outage(server, start=2.0, end=30.0))

    def standby_races() -> None:  # after the apiserver came back, the standby's PUT lands first: ours is a 409
        server.before_write = server.taken_over

    replica.script[29.0] = standby_races
    assert replica.serve() is False
    assert replica.paused == [10.0] and replica.resumed == []
    assert replica.now == 31.0  # the 409 at 30 decided nothing; the read at 31 saw the other holder
    assert server.holder() == (OTHER, 1)


def test_a_stop_said_just_before_the_pause_ends_the_operator_instead_of_resuming_it() -> None:
    # The operator wrote "release" and was paused before the lease process read it: its handler threads may still
    # run, and the Lease was not renewed, so it must not run again.
    server = LeaseServer()
    replica = Replica(server, outage(server, start=2.0, end=30.0))
    replica.stops_at(11.0)

    assert replica.serve() is False
    assert replica.paused == [10.0] and replica.resumed == []


def test_a_paused_leader_may_renew_only_an_unchanged_lease_of_its_own() -> None:
    server = LeaseServer()
    server._store(claimed(None, IDENTITY, datetime.now(UTC), LEASE_S, namespace="kiln-system", name="lease"))
    assert still_ours(server.lease, IDENTITY, 0)
    assert not still_ours(server.lease, IDENTITY, 1)  # counted at a different renewal
    assert not still_ours(server.lease, OTHER, 0)
    server.taken_back_by_a_namesake()
    assert server.holder() == (IDENTITY, 2) and not still_ours(server.lease, IDENTITY, 0)
    assert server.lease is not None and not still_ours(released(server.lease, datetime.now(UTC)), IDENTITY, 2)
    assert not still_ours(None, IDENTITY, 0)


FENCED = """
import os, signal, time
from kiln.operator.runner import leave_pid_1

def state(pid):
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rpartition(")")[2].split()[0]

leave_pid_1()  # as the container's entrypoint does, via run()
operator = os.getpid()
if os.fork() == 0:  # the lease process's fence
    os.kill(operator, signal.SIGSTOP)
    time.sleep(0.5)
    print("paused", state(operator), flush=True)
    os.kill(operator, signal.SIGCONT)
    time.sleep(0.5)
    print("resumed", state(operator), flush=True)
    os.kill(operator, signal.SIGKILL)
    os._exit(0)
while True:  # asleep whenever the fence looks, not waking every moment: a busy VM caught a wake-up as "R"
    time.sleep(60)
"""


def test_the_operator_is_not_pid_1_so_the_fence_reaches_it() -> None:
    unshare = ["unshare", "--pid", "--fork", "--mount-proc", "--map-root-user"]
    if subprocess.run([*unshare, "true"], capture_output=True, check=False).returncode != 0:
        pytest.skip("no unprivileged PID namespaces here")
    done = subprocess.run([*unshare, sys.executable, "-c", textwrap.dedent(FENCED)], capture_output=True, text=True,
                          timeout=30, check=False)  # fmt: skip
    assert done.stdout.split() == ["paused", "T", "resumed", "S"], done.stdout + done.stderr
    assert done.returncode == 128 + 9, done.stderr  # init exits as the shell would report the SIGKILLed operator


def test_a_release_that_cannot_reach_the_apiserver_leaves_the_lease_to_expire() -> None:
    """A clean stop during an outage: urllib3's MaxRetryError (not an OSError) must not escape the release."""
    server = LeaseServer()
    replica = Replica(server, {})
    assert replica.elector.try_once() is True

    def unreachable(method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        raise urllib3.exceptions.MaxRetryError(None, path, ConnectionRefusedError("refused"))  # type: ignore[arg-type]

    server.request = unreachable  # type: ignore[method-assign]
    replica.elector.release()
    assert server.holder() == (IDENTITY, 0)  # unchanged: it expires instead
