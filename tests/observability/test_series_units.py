"""The pieces of the series that need no process: which port each rank serves on, and how the operator turns
the TrainingJobs it watches into per-phase, per-job and queue-wait series."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from kiln.operator.metrics import Metrics
from kiln.trainer.observability import status_port


def test_each_local_rank_gets_its_own_port() -> None:
    assert [status_port(k, {}) for k in range(3)] == [9400, 9401, 9402]  # pods: METRICS_PORT + local rank
    assert [status_port(k, {"KILN_METRICS_PORT": "9000"}) for k in range(2)] == [9000, 9001]
    assert status_port(1, {"KILN_METRICS_PORT": "0"}) == 0  # off
    listed = {"KILN_METRICS_PORTS": "41000,41007", "KILN_METRICS_PORT": "9000"}  # kiln run: one free port each
    assert [status_port(k, listed) for k in range(3)] == [41000, 41007, 0]


def samples(metrics: Metrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(metrics.exposition().decode())
        for sample in family.samples
    }


def job(phase: str | None, restarts: int = 0, start: str | None = None) -> dict:
    status = {"restarts": restarts, **({"phase": phase} if phase else {}), **({"startTime": start} if start else {})}
    return {"metadata": {"creationTimestamp": "2026-01-01T10:00:00Z"}, "status": status}


def test_queue_wait_is_observed_once_when_a_waiting_job_starts() -> None:
    metrics = Metrics()
    metrics.observe_trainingjob("u1", "ml", "a", job(None))  # just created: Pending
    metrics.observe_trainingjob("u1", "ml", "a", job("Queued"))
    metrics.observe_trainingjob("u1", "ml", "a", job("Running", start="2026-01-01T10:01:30Z"))
    metrics.observe_trainingjob("u1", "ml", "a", job("Restarting", 1, start="2026-01-01T10:01:30Z"))
    metrics.observe_trainingjob("u1", "ml", "a", job("Running", 1, start="2026-01-01T10:01:30Z"))
    # A job first seen Running (the operator restarted) has no wait this operator saw begin.
    metrics.observe_trainingjob("u2", "ml", "b", job("Running", start="2026-01-01T10:05:00Z"))
    got = samples(metrics)
    assert got[("kiln_operator_queue_wait_seconds_count", frozenset())] == 1
    assert got[("kiln_operator_queue_wait_seconds_sum", frozenset())] == 90


def test_a_job_whose_pod_cannot_start_is_blocked_until_it_starts() -> None:
    metrics = Metrics()
    pending = job("Pending")
    running_false = {"type": "Running", "status": "False", "message": "worker 0 (pod p): 0/2 nodes are available"}
    pending["status"]["conditions"] = [{**running_false, "reason": "Unschedulable"}]
    metrics.observe_trainingjob("u1", "ml", "a", pending)
    other = job("Restarting", 1)
    other["status"]["conditions"] = [{**running_false, "reason": "RetriableFailure"}]  # a failure, not a block
    metrics.observe_trainingjob("u2", "ml", "b", other)
    got = samples(metrics)
    a = frozenset({("trainingjob_namespace", "ml"), ("trainingjob", "a"), ("reason", "Unschedulable")})
    assert got[("kiln_trainingjob_blocked", a)] == 1
    assert [key for key in got if key[0] == "kiln_trainingjob_blocked"] == [("kiln_trainingjob_blocked", a)]
    pending["status"]["conditions"] = [{**running_false, "reason": "PodsStarting"}]
    metrics.observe_trainingjob("u1", "ml", "a", pending)
    assert not [key for key in samples(metrics) if key[0] == "kiln_trainingjob_blocked"]


def test_every_job_has_its_phase_and_restarts_until_deleted() -> None:
    metrics = Metrics()
    metrics.observe_trainingjob("u1", "ml", "a", job("Running", 2))
    metrics.observe_trainingjob("u2", "team", "b", job("Failed"))
    got = samples(metrics)
    a = frozenset({("trainingjob_namespace", "ml"), ("trainingjob", "a")})
    assert got[("kiln_trainingjob_phase", a | {("phase", "Running")})] == 1
    assert got[("kiln_trainingjob_restarts", a)] == 2
    assert got[("kiln_trainingjobs", frozenset({("phase", "Failed")}))] == 1
    assert got[("kiln_trainingjobs", frozenset({("phase", "Succeeded")}))] == 0
    metrics.observe_trainingjob("u1", "ml", "a", None)
    assert not [key for key in samples(metrics) if ("trainingjob", "a") in key[1]]
    assert samples(metrics)[("kiln_trainingjobs", frozenset({("phase", "Running")}))] == 0
