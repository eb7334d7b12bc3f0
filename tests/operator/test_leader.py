"""The leader election's pure part: what a replica does about a Lease, given what it saw and its own clock."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from kiln.operator.leader import Action, claimed, decide, micro_time, released, sight
from kiln.operator.settings import Settings, from_env

WALL = datetime(2026, 11, 30, 12, 0, 0, 123456, tzinfo=UTC)


def lease(holder: str = "a", renew: str = "2026-11-30T11:59:58.000000Z", duration: int = 10, **spec: Any) -> dict:
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": "kiln-operator", "namespace": "kiln-system", "resourceVersion": "41"},
        "spec": {"holderIdentity": holder, "renewTime": renew, "leaseDurationSeconds": duration, **spec},
    }


def test_no_lease_is_acquired() -> None:
    assert decide(None, sight(None, None, 100.0), "b", 100.0) is Action.ACQUIRE


def test_the_holder_renews_its_own_lease() -> None:
    held = lease(holder="b")
    assert decide(held, sight(None, held, 100.0), "b", 100.0) is Action.RENEW


def test_a_live_lease_of_another_replica_means_standby_until_it_goes_unrenewed_for_its_duration() -> None:
    held = lease(holder="a", duration=10)
    first = sight(None, held, 100.0)
    assert decide(held, first, "b", 100.0) is Action.STANDBY
    # The same record, unrenewed: the clock runs from when this replica first saw it.
    later = sight(first, held, 109.9)
    assert later == first
    assert decide(held, later, "b", 109.9) is Action.STANDBY
    assert decide(held, sight(later, held, 110.0), "b", 110.0) is Action.ACQUIRE


def test_a_renewal_restarts_the_standbys_clock_whatever_the_renew_time_says() -> None:
    # renewTime far in the past (a holder whose clock lags): only the change counts, judged on our clock.
    held = lease(holder="a", renew="2020-01-01T00:00:00.000000Z")
    first = sight(None, held, 100.0)
    renewed = lease(holder="a", renew="2020-01-01T00:00:02.000000Z")
    second = sight(first, renewed, 108.0)
    assert second.at == 108.0
    assert decide(renewed, second, "b", 117.0) is Action.STANDBY
    assert decide(renewed, second, "b", 118.0) is Action.ACQUIRE


def test_a_released_lease_is_acquired_at_once() -> None:
    free = released(lease(holder="a"), WALL)
    assert free["spec"]["holderIdentity"] == "" and free["spec"]["renewTime"] == micro_time(WALL)
    assert decide(free, sight(None, free, 100.0), "b", 100.0) is Action.ACQUIRE


def test_claiming_a_new_lease_starts_it_without_transitions() -> None:
    body = claimed(None, "a", WALL, 10.0, namespace="kiln-system", name="kiln-operator")
    assert body["metadata"] == {"name": "kiln-operator", "namespace": "kiln-system"}
    assert body["spec"] == {
        "holderIdentity": "a",
        "leaseDurationSeconds": 10,
        "acquireTime": "2026-11-30T12:00:00.123456Z",
        "renewTime": "2026-11-30T12:00:00.123456Z",
        "leaseTransitions": 0,
    }


def test_renewing_keeps_the_acquire_time_and_taking_over_counts_a_transition() -> None:
    mine = lease(holder="a", acquireTime="2026-11-30T11:00:00.000000Z", leaseTransitions=2)
    renewed = claimed(mine, "a", WALL, 10.0, namespace="kiln-system", name="kiln-operator")
    assert renewed["spec"]["acquireTime"] == "2026-11-30T11:00:00.000000Z"
    assert renewed["spec"]["leaseTransitions"] == 2
    # The resourceVersion makes a concurrent writer's update fail (409) rather than both winning.
    assert renewed["metadata"]["resourceVersion"] == "41"
    taken = claimed(mine, "b", WALL, 10.0, namespace="kiln-system", name="kiln-operator")
    assert taken["spec"]["holderIdentity"] == "b" and taken["spec"]["leaseTransitions"] == 3
    assert taken["spec"]["acquireTime"] == taken["spec"]["renewTime"] == micro_time(WALL)


def test_the_default_timings_let_the_leader_stop_before_a_standby_can_take_over() -> None:
    s = Settings()
    assert s.retry_period_s < s.renew_deadline_s < s.lease_duration_s


@pytest.mark.parametrize(
    "environ",
    [
        {"KILN_OPERATOR_RENEW_DEADLINE_S": "10"},  # equal to the lease duration
        {"KILN_OPERATOR_RETRY_PERIOD_S": "8"},  # longer than the renew deadline
        {"KILN_OPERATOR_RETRY_PERIOD_S": "0"},
    ],
)
def test_lease_timings_out_of_order_are_refused_naming_the_settings(environ: dict[str, str]) -> None:
    with pytest.raises(ValueError, match=r"KILN_OPERATOR_RENEW_DEADLINE_S .* < KILN_OPERATOR_LEASE_DURATION_S"):
        from_env(environ)
