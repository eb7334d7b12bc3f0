"""Kiln's Grafana dashboards, as code: ``python -m kiln.testing.dashboards`` writes them to DASHBOARD_DIR.

Built with grafana-foundation-sdk (a dev dependency, so this lives under kiln.testing and nothing at runtime
imports it). The JSON files are generated and committed for the Helm chart to ship as ConfigMaps;
tests/observability/test_dashboards.py fails when they are stale, and test_prometheus.py runs every panel's
PromQL against a real Prometheus scraping a live trainer and operator. Panels read only the series in
trainer/observability.py and operator/metrics.py, with the per-job labels of kiln.api.contract.MetricLabel.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders import common, stat, table, timeseries
from grafana_foundation_sdk.builders.dashboard import Dashboard, DatasourceVariable, QueryVariable, Row
from grafana_foundation_sdk.builders.prometheus import Dataquery
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.common import LegendDisplayMode, LegendPlacement, StackingMode
from grafana_foundation_sdk.models.dashboard import DataSourceRef, VariableRefresh, VariableSort
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

from kiln.api.contract import MetricLabel

DASHBOARD_DIR = Path(__file__).resolve().parents[2] / "helm" / "kiln" / "files" / "dashboards"
DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
TAGS = ["kiln"]
# The selected job, on every trainer query.
JOB = f'{MetricLabel.NAMESPACE}="$namespace", {MetricLabel.JOB}="$job"'


def query(expr: str, legend: str = "__auto") -> Dataquery:
    return Dataquery().expr(expr).legend_format(legend).datasource(DATASOURCE)


def series(title: str, unit: str, *queries: Dataquery, description: str = "", stacked: bool = False) -> Any:
    panel = (
        timeseries.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .height(8)
        .span(12)
        .legend(
            common.VizLegendOptions()
            .show_legend(True)
            .display_mode(LegendDisplayMode.LIST)
            .placement(LegendPlacement.BOTTOM)
        )
    )
    if stacked:
        panel = panel.stacking(common.StackingConfig().mode(StackingMode.NORMAL)).fill_opacity(30)
    for target in queries:
        panel = panel.with_target(target)
    return panel


def single(title: str, unit: str, expr: str, description: str = "") -> Any:
    return (
        stat.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .height(4)
        .span(4)
        .reduce_options(common.ReduceDataOptions().calcs(["lastNotNull"]))
        .with_target(query(expr))
    )


def datasource_variable() -> DatasourceVariable:
    return DatasourceVariable("datasource").label("Data source").type("prometheus")


def label_variable(name: str, label: str, metric: str, key: str) -> QueryVariable:
    return (
        QueryVariable(name)
        .label(label)
        .datasource(DATASOURCE)
        .query(f"label_values({metric}, {key})")
        .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(VariableSort.ALPHABETICAL_ASC)
    )


def training_job() -> Dashboard:
    """One TrainingJob: where it is, how it learns, how fast each rank goes and what a failure would cost."""
    per_rank = f"sum by (rank) (rate(kiln_trainer_%s_sum{{{JOB}}}[$__rate_interval]))"
    return (
        Dashboard("Kiln / Training job")
        .uid("kiln-training-job")
        .description(
            "One TrainingJob's progress, loss, validation metrics, throughput per rank, data wait and "
            "checkpoints, from the trainer's kiln_trainer_* series (every rank is scraped)."
        )
        .tags(TAGS)
        .time("now-3h", "now")
        .refresh("30s")
        .with_variable(datasource_variable())
        .with_variable(
            label_variable("namespace", "Namespace", "kiln_trainer_start_timestamp_seconds", MetricLabel.NAMESPACE)
        )
        .with_variable(
            label_variable(
                "job",
                "TrainingJob",
                f'kiln_trainer_start_timestamp_seconds{{{MetricLabel.NAMESPACE}="$namespace"}}',
                MetricLabel.JOB,
            )
        )
        .with_row(Row("Where it is"))
        .with_panel(
            single(
                "Progress",
                "percentunit",
                f"max(kiln_trainer_progress_ratio{{{JOB}}})",
                "Optimizer steps done of the run's total.",
            )
        )
        .with_panel(single("Epoch", "none", f"max(kiln_trainer_epoch{{{JOB}}})", "Epochs completed."))
        .with_panel(single("Step", "none", f"max(kiln_trainer_step{{{JOB}}})", "Optimizer steps completed."))
        .with_panel(
            single(
                "Restarts",
                "none",
                f"max(kiln_trainer_restarts{{{JOB}}})",
                "Whole-gang restarts before the running attempt.",
            )
        )
        .with_panel(
            single(
                "Checkpoint age",
                "s",
                f"time() - max(kiln_trainer_checkpoint_last_save_timestamp_seconds{{{JOB}}})",
                "Time since the last checkpoint save: the training a failure now would lose.",
            )
        )
        .with_panel(single("Last checkpoint size", "bytes", f"max(kiln_trainer_checkpoint_size_bytes{{{JOB}}})"))
        .with_row(Row("How it learns"))
        .with_panel(
            series(
                "Training loss",
                "none",
                query(f"avg(kiln_trainer_loss{{{JOB}}})", "loss"),
                query(f"avg by (term) (kiln_trainer_loss_term{{{JOB}}})", "{{term}}"),
                description="The loss, averaged over ranks, and the unweighted terms of a combined loss.",
            )
        )
        .with_panel(
            series(
                "Validation metrics",
                "none",
                query(f"max by (metric) (kiln_trainer_validation{{{JOB}}})", "{{metric}}"),
                description="The latest validation metrics (validation.every epochs).",
            )
        )
        .with_panel(series("Learning rate", "none", query(f"max(kiln_trainer_learning_rate{{{JOB}}})", "lr")))
        .with_panel(series("Progress", "percentunit", query(f"max(kiln_trainer_progress_ratio{{{JOB}}})", "done")))
        .with_row(Row("Speed, per rank"))
        .with_panel(
            series(
                "Throughput per rank",
                "none",
                query(f"kiln_trainer_samples_per_second{{{JOB}}}", "rank {{rank}}"),
                description="Training images per second on each rank; the stack is the job's total. "
                "A straggler is the lowest band.",
                stacked=True,
            )
        )
        .with_panel(
            series(
                "Step time per rank",
                "s",
                query(
                    f"{per_rank % 'step_seconds'} / sum by (rank) "
                    f"(rate(kiln_trainer_step_seconds_count{{{JOB}}}[$__rate_interval]))",
                    "rank {{rank}}",
                ),
                description="Mean wall time of a training step, data wait included.",
            )
        )
        .with_panel(
            series(
                "Data wait share per rank",
                "percentunit",
                query(f"{per_rank % 'data_wait_seconds'} / {per_rank % 'step_seconds'}", "rank {{rank}}"),
                description="Share of step time spent waiting for the DataLoader; above half, the "
                "input pipeline is the bottleneck (alert KilnDataWaitDominatesStepTime).",
            )
        )
        .with_panel(
            series(
                "GPU memory per rank",
                "bytes",
                query(f"kiln_trainer_accelerator_memory_bytes{{{JOB}}}", "rank {{rank}}"),
                description="Peak CUDA memory allocated by each rank (GPU jobs only).",
            )
        )
        .with_row(Row("Checkpoints"))
        .with_panel(
            series(
                "Checkpoint save duration", "s", query(f"max(kiln_trainer_checkpoint_save_seconds{{{JOB}}})", "save")
            )
        )
        .with_panel(
            series(
                "Checkpoint age",
                "s",
                query(f"time() - max(kiln_trainer_checkpoint_last_save_timestamp_seconds{{{JOB}}})", "age"),
                description="Alert KilnCheckpointTooOld fires above two hours.",
            )
        )
    )


def operator() -> Dashboard:
    """The operator: how often and how fast it reconciles, and where the TrainingJobs are."""
    rate = "sum by ({by}) (rate(kiln_operator_{name}[$__rate_interval]))"
    latency = "histogram_quantile({q}, sum by (le) (rate(kiln_operator_{name}_bucket[$__rate_interval])))"
    return (
        Dashboard("Kiln / Operator")
        .uid("kiln-operator")
        .description(
            "The Kiln operator's reconciles and the TrainingJobs it manages (kiln_operator_* and "
            "kiln_trainingjob* series)."
        )
        .tags(TAGS)
        .time("now-6h", "now")
        .refresh("30s")
        .with_variable(datasource_variable())
        .with_row(Row("Reconciles"))
        .with_panel(
            series(
                "Reconcile rate",
                "reqps",
                query(rate.format(by="kind, result", name="reconcile_total"), "{{kind}} {{result}}"),
                description="Reconciles per second by trigger (trainingjob, job, resync, exportjob, "
                "...) and result (ok, error, gone).",
            )
        )
        .with_panel(
            series(
                "Reconcile latency",
                "s",
                *(
                    query(latency.format(q=q, name="reconcile_duration_seconds"), f"p{round(q * 100)}")
                    for q in (0.5, 0.95, 0.99)
                ),
            )
        )
        .with_row(Row("TrainingJobs"))
        .with_panel(
            series(
                "TrainingJobs by phase", "none", query("sum by (phase) (kiln_trainingjobs)", "{{phase}}"), stacked=True
            )
        )
        .with_panel(
            series(
                "Queue wait",
                "s",
                *(query(latency.format(q=q, name="queue_wait_seconds"), f"p{round(q * 100)}") for q in (0.5, 0.95)),
                description="From a TrainingJob's creation to its first attempt's start (Kueue admission included).",
            )
        )
        .with_panel(
            series(
                "TrainingJobs that cannot start",
                "none",
                # "or on() vector(0)": a zero line while nothing is blocked, instead of "no data".
                query("sum by (reason) (kiln_trainingjob_blocked) or on() vector(0)", "{{reason}}"),
                description="TrainingJobs with a pod that cannot start, by reason (Unschedulable, ImagePullBackOff, "
                "CreateContainerConfigError, ...); the TrainingJob's Running condition has the message.",
                stacked=True,
            )
        )
        .with_panel(
            table.Panel()
            .title("TrainingJobs")
            .description("Every TrainingJob's phase and whole-gang restarts.")
            .datasource(DATASOURCE)
            .height(8)
            .span(24)
            .with_target(
                query("max by (trainingjob_namespace, trainingjob, phase) (kiln_trainingjob_phase) == 1")
                .instant()
                .format(PromQueryFormat.TABLE)
            )
            .with_target(
                query("max by (trainingjob_namespace, trainingjob) (kiln_trainingjob_restarts)")
                .instant()
                .format(PromQueryFormat.TABLE)
                .ref_id("B")
            )
        )
    )


DASHBOARDS: dict[str, Callable[[], Dashboard]] = {
    "kiln-training-job.json": training_job,
    "kiln-operator.json": operator,
}


def render(build: Callable[[], Dashboard]) -> str:
    """The dashboard as stable JSON (sorted keys), the form committed under DASHBOARD_DIR."""
    text = JSONEncoder(sort_keys=True, indent=2).encode(build().build())
    return json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    out = Path((argv or sys.argv[1:] or [str(DASHBOARD_DIR)])[0])
    out.mkdir(parents=True, exist_ok=True)
    for name, build in DASHBOARDS.items():
        (out / name).write_text(render(build))
        print(f"wrote {out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
