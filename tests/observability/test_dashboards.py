"""The Grafana dashboards are generated (kiln.testing.dashboards, grafana-foundation-sdk) and committed: they must
match the generator, and show what issue 12 asks of them. test_prometheus.py runs their queries for real."""

from __future__ import annotations

import json

import pytest

from kiln.testing.dashboards import DASHBOARD_DIR, DASHBOARDS, render


@pytest.mark.parametrize("name", sorted(DASHBOARDS))
def test_the_committed_dashboard_is_what_the_generator_writes(name: str) -> None:
    committed = DASHBOARD_DIR / name
    assert committed.exists(), f"{committed} missing: run `python -m kiln.testing.dashboards`"
    assert committed.read_text() == render(DASHBOARDS[name]), (
        f"{committed} is stale: run `python -m kiln.testing.dashboards`"
    )


def panels(name: str) -> list[dict]:
    return [panel for panel in json.loads((DASHBOARD_DIR / name).read_text())["panels"] if panel["type"] != "row"]


def test_the_training_job_dashboard_picks_a_job_and_shows_what_was_asked() -> None:
    dashboard = json.loads((DASHBOARD_DIR / "kiln-training-job.json").read_text())
    assert dashboard["title"] == "Kiln / Training job"
    assert [variable["name"] for variable in dashboard["templating"]["list"]] == ["datasource", "namespace", "job"]
    exprs = " ".join(target["expr"] for panel in panels("kiln-training-job.json") for target in panel["targets"])
    for series in ("kiln_trainer_loss", "kiln_trainer_loss_term", "kiln_trainer_validation",
                   "kiln_trainer_samples_per_second", "kiln_trainer_data_wait_seconds_sum",
                   "kiln_trainer_checkpoint_last_save_timestamp_seconds", "kiln_trainer_restarts",
                   "kiln_trainer_progress_ratio", "kiln_trainer_epoch"):  # fmt: skip
        assert series in exprs, series
    for panel in panels("kiln-training-job.json"):
        for target in panel["targets"]:
            assert 'trainingjob_namespace="$namespace", trainingjob="$job"' in target["expr"], panel["title"]


def test_the_operator_dashboard_shows_reconciles_and_jobs_by_phase() -> None:
    exprs = " ".join(target["expr"] for panel in panels("kiln-operator.json") for target in panel["targets"])
    for series in ("kiln_operator_reconcile_total", "kiln_operator_reconcile_duration_seconds_bucket",
                   "kiln_trainingjobs", "kiln_operator_queue_wait_seconds_bucket",
                   "kiln_trainingjob_blocked"):  # fmt: skip
        assert series in exprs, series
