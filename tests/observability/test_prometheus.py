"""Metrics worth dashboards, proven live: a two-rank ``kiln run`` trainer and the operator (on the real control
plane) scraped by a real Prometheus, which then runs every panel's query of the shipped dashboards and evaluates
the shipped alert rules.

One module-scoped stack serves both tests, so the trainer starts once: first every rank's /metrics is read
directly and each series asserted; then the same series go through Prometheus.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from live_stack import (
    JOB_NAME,
    JOB_NAMESPACE,
    Prometheus,
    admit,
    attempt_pod,
    create_queued_job,
    http_get,
    rank_targets,
    segmentation_manifest,
    set_pod_status,
    start_kiln_run,
    targets_file,
    wait_status,
)
from prometheus_client.parser import text_string_to_metric_families

from kiln.testing.controlplane import ControlPlane
from kiln.testing.dashboards import DASHBOARD_DIR, DASHBOARDS
from kiln.testing.processes import wait_until
from kiln.trainer.shapes import write_shapes
from tests.local.local_testkit import kill_everything
from tests.operator.operator_process import OperatorProcess

pytestmark = [pytest.mark.controlplane, pytest.mark.slow, pytest.mark.timeout(600)]

RANKS = 2
# Series only global rank 0 has: it alone writes checkpoints.
RANK0_ONLY = {"kiln_trainer_checkpoint_save_seconds", "kiln_trainer_checkpoint_size_bytes",
              "kiln_trainer_checkpoint_last_save_timestamp_seconds"}  # fmt: skip
# Only with a GPU; this run trains on the CPU (gpusPerNode 0).
GPU_ONLY = "kiln_trainer_accelerator_memory_bytes"
# Grafana's variables, as a dashboard user would have them for this job.
VARIABLES = {"$namespace": JOB_NAMESPACE, "$job": JOB_NAME, "$__rate_interval": "1m", "$__range": "5m",
             "$__interval": "2s"}  # fmt: skip


@dataclass
class Stack:
    root: Path
    ranks: list[str]
    prometheus: Prometheus
    operator: OperatorProcess


@pytest.fixture(scope="module")
def stack(cluster: ControlPlane, kiln_crds: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("observability")
    data = write_shapes(root / "shapes", splits={"train": 32, "val": 8}, size=32)
    run = start_kiln_run(segmentation_manifest(root / "job.json", data), root)
    operator: OperatorProcess | None = None
    prometheus: Prometheus | None = None
    try:
        operator = OperatorProcess(cluster.kubeconfig, root / "operator.log").start()

        def started() -> bool:
            assert run.poll() is None, (root / "kiln-run.log").read_text()[-3000:]
            return targets_file(root).exists()

        wait_until(started, timeout=60, what="kiln run's Prometheus targets file")
        prometheus = Prometheus(root / "prometheus", targets_file(root), f"127.0.0.1:{operator.metrics_port}").start()
        yield Stack(root, rank_targets(root), prometheus, operator)
    finally:
        if prometheus is not None:
            prometheus.stop()
        if operator is not None:
            operator.stop()
        kill_everything(run)  # type: ignore[arg-type]


def scrape(target: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """{sample name: [(labels, value), ...]} of one rank's /metrics."""
    status, body = http_get(f"http://{target}/metrics")
    assert status == 200, (target, status)
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((dict(sample.labels), float(sample.value)))
    return samples


def one(samples: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str) -> float:
    matching = [value for got, value in samples.get(name, []) if labels.items() <= got.items()]
    assert len(matching) == 1, (name, labels, samples.get(name))
    return matching[0]


def test_every_rank_serves_every_series_labelled_by_job_rank_and_node(stack: Stack) -> None:
    assert len(stack.ranks) == RANKS and len(set(stack.ranks)) == RANKS  # a port of its own for each rank

    def trained_an_epoch() -> bool:
        scraped = [scrape(target) for target in stack.ranks]
        return "kiln_trainer_checkpoint_last_save_timestamp_seconds" in scraped[0] and all(
            "kiln_trainer_validation" in samples for samples in scraped
        )

    wait_until(trained_an_epoch, timeout=300, what="a validated, checkpointed epoch on every rank", interval=1)
    for rank, target in enumerate(stack.ranks):
        samples = scrape(target)
        # One process per node: the node rank is the rank.
        own = {"trainingjob_namespace": JOB_NAMESPACE, "trainingjob": JOB_NAME, "rank": str(rank),
               "node_rank": str(rank)}  # fmt: skip
        for name, _labels in ((n, s) for n, s in samples.items() if n.startswith("kiln_trainer_")):
            for labels, _value in samples[name]:
                assert own.items() <= labels.items(), (name, labels)
        assert one(samples, "kiln_trainer_step_seconds_count", **own) >= 1
        assert one(samples, "kiln_trainer_step_seconds_sum", **own) > 0
        assert one(samples, "kiln_trainer_data_wait_seconds_count", **own) >= 1
        assert one(samples, "kiln_trainer_data_wait_seconds_sum", **own) >= 0
        assert one(samples, "kiln_trainer_samples_per_second", **own) > 0
        loss = one(samples, "kiln_trainer_loss", **own)
        terms = {labels["term"]: value for labels, value in samples["kiln_trainer_loss_term"]}
        assert set(terms) == {"dice", "cross_entropy"} and loss > 0 and all(v >= 0 for v in terms.values())
        assert one(samples, "kiln_trainer_learning_rate", **own) > 0
        assert 0 <= one(samples, "kiln_trainer_validation", metric="miou", **own) <= 1
        assert one(samples, "kiln_trainer_epoch", **own) >= 1
        assert one(samples, "kiln_trainer_step", **own) > 0
        assert 0 < one(samples, "kiln_trainer_progress_ratio", **own) < 1
        assert one(samples, "kiln_trainer_restarts", **own) == 0
        assert abs(one(samples, "kiln_trainer_start_timestamp_seconds", **own) - time.time()) < 3600
        assert GPU_ONLY not in samples  # trained on the CPU
        if rank == 0:
            assert one(samples, "kiln_trainer_checkpoint_save_seconds", **own) > 0
            assert one(samples, "kiln_trainer_checkpoint_size_bytes", **own) > 100_000  # a U-Net's weights
            saved_at = one(samples, "kiln_trainer_checkpoint_last_save_timestamp_seconds", **own)
            assert 0 <= time.time() - saved_at < 600
            status, body = http_get(f"http://{target}/progress")
            assert status == 200 and json.loads(body)["state"] == "running"
        else:
            assert not RANK0_ONLY & set(samples)
            assert http_get(f"http://{target}/progress")[0] == 404  # only global rank 0 reports progress


def panel_queries(name: str) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target of every panel, Grafana's variables substituted."""
    dashboard = json.loads((DASHBOARD_DIR / name).read_text())
    queries = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in sorted(VARIABLES.items(), key=lambda item: -len(item[0])):
                expr = expr.replace(variable, value)
            assert "$" not in expr, (panel["title"], expr)
            queries.append((panel["title"], expr))
    return queries


def drive_a_job_through_the_queue_and_a_restart(cluster: ControlPlane, namespace: str) -> None:
    """Queued (waiting for Kueue) -> admitted -> Running -> a lost node (137) -> restart 1: every operator series
    the dashboards read gets real values, the queue wait among them."""
    create_queued_job(cluster, namespace, "queued")
    wait_status(cluster, namespace, "queued", "phase", "Queued")
    time.sleep(2)  # a queue wait worth the name
    admit(cluster, namespace, "queued-1")
    set_pod_status(cluster, attempt_pod(cluster, namespace, 1), exit_code=None)
    wait_status(cluster, namespace, "queued", "phase", "Running")
    set_pod_status(cluster, attempt_pod(cluster, namespace, 1), exit_code=137)
    wait_status(cluster, namespace, "queued", "restarts", 1)


def test_every_dashboard_query_answers_from_a_real_prometheus(
    stack: Stack, cluster: ControlPlane, namespace: str
) -> None:
    prom = stack.prometheus
    job = f'trainingjob_namespace="{JOB_NAMESPACE}", trainingjob="{JOB_NAME}"'
    trainer_ready = (f"kiln_trainer_checkpoint_last_save_timestamp_seconds{{{job}}}",
                     f'count(kiln_trainer_validation{{{job}, metric="miou"}}) == {RANKS}',
                     f"rate(kiln_trainer_step_seconds_count{{{job}}}[1m]) > 0")  # fmt: skip
    # The operator's panels are rates over 1 m, so its queue wait and restart are driven only once the trainer's
    # series are there (that wait can pass a minute under load), and the queries follow within the window.
    operator_ready = ("rate(kiln_operator_queue_wait_seconds_count[1m]) > 0",
                      f'kiln_trainingjob_restarts{{trainingjob_namespace="{namespace}", trainingjob="queued"}} == 1',
                      "rate(kiln_operator_reconcile_total[1m]) > 0")  # fmt: skip
    for ready in trainer_ready:
        wait_until(lambda expr=ready: prom.has(expr), timeout=240, what=f"Prometheus: {ready}", interval=1)
    drive_a_job_through_the_queue_and_a_restart(cluster, namespace)
    for ready in operator_ready:
        wait_until(lambda expr=ready: prom.has(expr), timeout=60, what=f"Prometheus: {ready}", interval=1)

    at = time.time()
    failures: list[str] = []
    for name in sorted(DASHBOARDS):
        for title, expr in panel_queries(name):
            try:
                result = prom.query(expr, at)
            except AssertionError as error:
                failures.append(f"{name} / {title}: {expr}: query failed: {error}")
                continue
            if GPU_ONLY in expr:
                if result:
                    failures.append(f"{name} / {title}: {expr}: GPU memory from a CPU run: {result}")
                continue
            if not result:
                failures.append(f"{name} / {title}: {expr}: no series")
            elif not any(math.isfinite(float(sample["value"][1])) for sample in result):
                failures.append(f"{name} / {title}: {expr}: no finite value: {result}")
    assert not failures, "\n".join(failures)
    assert len(prom.query(f"kiln_trainer_samples_per_second{{{job}}}", at)) == RANKS  # throughput per rank


def test_dashboard_variables_offer_the_running_job(stack: Stack) -> None:
    dashboard = json.loads((DASHBOARD_DIR / "kiln-training-job.json").read_text())
    offered: dict[str, list[str]] = {}
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        match = re.fullmatch(r"label_values\((.+), (\w+)\)", variable["query"])
        assert match is not None, variable["query"]
        selector, label = match.groups()
        for name, value in offered.items():
            selector = selector.replace(f"${name}", value[0])
        found: list[Any] = []

        def offered_values(selector: str = selector, label: str = label, found: list[Any] = found) -> bool:
            # A label's values appear once Prometheus has scraped the series since the job started.
            found[:] = stack.prometheus.api(f"label/{label}/values", **{"match[]": selector})
            return bool(found)

        wait_until(offered_values, timeout=90, what=f"values of {label} for {selector}", interval=1)
        offered[variable["name"]] = sorted(found)
    assert offered == {"namespace": [JOB_NAMESPACE], "job": [JOB_NAME]}


def test_the_shipped_alert_rules_evaluate_cleanly_on_live_series(stack: Stack) -> None:
    def evaluated() -> list[dict[str, Any]]:
        groups = stack.prometheus.api("rules")["groups"]
        return [rule for group in groups for rule in group["rules"]]

    wait_until(lambda: all(rule.get("lastEvaluation", "").startswith("2") for rule in evaluated()) and
               len(evaluated()) == 7, timeout=30, what="every rule evaluated")  # fmt: skip
    unhealthy = [(rule["name"], rule.get("lastError")) for rule in evaluated() if rule["health"] != "ok"]
    assert not unhealthy, unhealthy
