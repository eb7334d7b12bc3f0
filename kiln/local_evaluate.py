"""``kiln evaluate --checkpoint URI [--checkpoint URI ...] --data URI [--split test] [--output DIR]``.

Each checkpoint is evaluated on the dataset by ``python -m kiln.trainer.evaluate``, a child process (the
trainer's own ``epochs: 0`` evaluation, as a pod runs it), into a folder of its own under ``--output``:
``evaluation.json``, the predictions, the pictures, ``summary.json`` and the evaluation job it ran
(``trainingjob.json``). One child evaluates them all, so torch is imported once (its log:
``<output>/evaluate.log``). The result is one table, a row per checkpoint and the task's metrics as columns.
Torch-free: everything torch-shaped happens in the child.

The data's layout is recognized from its files when it is local (``--format`` overrides; an s3:// dataset
takes the checkpoint's own format unless ``--format`` says otherwise), so a checkpoint of another task than
the data is refused in one line. Exit codes (kiln.api.contract.ExitCode): 0 every checkpoint evaluated;
2 invalid input (a missing checkpoint, a task mismatch, unreadable data); 1 an evaluation failed otherwise.
With several checkpoints every one is tried, and the exit code is the first failure's.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from rich.console import Console
from rich.table import Table

from kiln.api.contract import ExitCode, TrainerReport, parse_report

DEFAULT_OUTPUT = Path(".kiln/evaluations")
SPLITS = ("val", "test")
LOG_FILE, TERMINATION_FILE = "evaluate.log", "termination-log"
STATE = "state.pt"


class InvalidArgument(Exception):
    """A flag the CLI refuses before any child starts; the message names the flag."""


@dataclass(frozen=True)
class Planned:
    checkpoint: str
    label: str
    output: Path


@dataclass(frozen=True)
class Request:
    """What every checkpoint is evaluated on: the flags that are not per checkpoint."""

    data: str
    split: str
    data_format: str | None
    endpoint_url: str | None


@dataclass(frozen=True)
class Outcome:
    planned: Planned
    code: int
    report: TrainerReport | None


def guess_format(data: str) -> str | None:
    """The layout of a local dataset from its files (None for s3:// or an unrecognized folder): coco
    (annotations.json), voc (Annotations/ and JPEGImages/), yolo (labels/), segmentation-folder (images/ and
    masks/), csv (a single .csv file), else imagefolder when it holds class folders."""
    if data.startswith("s3://"):
        return None
    root = Path(data.removeprefix("file://"))
    if root.is_file():
        return "csv" if root.suffix == ".csv" else None
    if (root / "annotations.json").is_file():
        return "coco"
    if (root / "Annotations").is_dir() and (root / "JPEGImages").is_dir():
        return "voc"
    if (root / "labels").is_dir():
        return "yolo"
    if (root / "images").is_dir() and (root / "masks").is_dir():
        return "segmentation-folder"
    if any(child.is_dir() for child in root.iterdir()):
        return "imagefolder"
    return None


def label_of(checkpoint: str, taken: set[str]) -> str:
    """A folder name for a checkpoint's outputs, from the last parts of its URI (run, then checkpoint folder),
    unique among ``taken``."""
    parts = [part for part in checkpoint.removeprefix("s3://").rstrip("/").split("/") if part not in ("", STATE)]
    base = re.sub(r"[^A-Za-z0-9._-]+", "-", "-".join(parts[-2:]) or "checkpoint")
    label, number = base, 2
    while label in taken:
        label, number = f"{base}-{number}", number + 1
    taken.add(label)
    return label


def plan(checkpoints: list[str], data: str, split: str, output: Path, cwd: Path) -> list[Planned]:
    """One output folder per checkpoint; InvalidArgument for what is wrong before any child starts."""
    if split not in SPLITS:
        raise InvalidArgument(f"--split: {split!r} is not one of {', '.join(SPLITS)}")
    if not data.startswith("s3://") and not Path(data.removeprefix("file://")).exists():
        raise InvalidArgument(f"--data: {data} does not exist")
    taken: set[str] = set()
    planned = []
    for given in checkpoints:
        uri = given
        if not given.startswith("s3://"):
            path = Path(given.removeprefix("file://"))
            uri = str(path if path.is_absolute() else (cwd / path).absolute())
            if not Path(uri).exists():
                raise InvalidArgument(f"--checkpoint: {uri} does not exist")
        label = label_of(uri, taken)
        planned.append(Planned(uri, label, (output if output.is_absolute() else cwd / output) / label))
    return planned


def run_evaluations(planned: list[Planned], request: Request, log_path: Path, cwd: Path) -> list[Outcome]:
    """Every checkpoint in one child process (torch is imported once); each report is read from its folder."""
    command = [sys.executable, "-m", "kiln.trainer.evaluate", "--data", request.data, "--split", request.split]
    for item in planned:
        item.output.mkdir(parents=True, exist_ok=True)
        (item.output / TERMINATION_FILE).unlink(missing_ok=True)
        command += ["--checkpoint", item.checkpoint, "--output", str(item.output)]
    command += ["--format", request.data_format] if request.data_format else []
    command += ["--endpoint-url", request.endpoint_url] if request.endpoint_url else []
    # No metrics port: nothing scrapes a laptop's evaluation, and a busy port must not fail it.
    env = {**os.environ, "KILN_LOG_STREAM": "stdout", "KILN_METRICS_PORT": "0"}
    with log_path.open("w") as log:
        result = subprocess.run(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, check=False)
    outcomes = []
    for item in planned:
        termination_log = item.output / TERMINATION_FILE
        report = parse_report(termination_log.read_text()) if termination_log.exists() else None
        if report is None:  # the child died before this evaluation reported
            code = result.returncode or ExitCode.FAILED
        else:
            code = int(report.exit_code) if report.exit_code else ExitCode.OK
        outcomes.append(Outcome(item, code, report))
    return outcomes


def metric_columns(outcomes: list[Outcome], split: str) -> list[str]:
    """The task's top-level metrics (per-class ones such as iou/3 stay in evaluation.json), as reported."""
    names: list[str] = []
    for outcome in outcomes:
        metrics = outcome.report.progress.metrics if outcome.report and outcome.report.progress else {}
        for key in metrics:
            name = key.removeprefix(f"{split}/")
            if key.startswith(f"{split}/") and "/" not in name and name not in names:
                names.append(name)
    return names


def comparison_table(outcomes: list[Outcome], split: str) -> Table:
    columns = metric_columns(outcomes, split)
    table = Table(title=f"{split} metrics, one row per checkpoint", title_justify="left")
    table.add_column("checkpoint", justify="left")
    for name in columns:
        table.add_column(name, justify="right")
    for outcome in outcomes:
        report = outcome.report
        metrics = report.progress.metrics if report is not None and report.progress else {}
        cells = [f"{metrics[f'{split}/{name}']:.4f}" if f"{split}/{name}" in metrics else "-" for name in columns]
        table.add_row(outcome.planned.label, *cells)
    return table


def evaluate_checkpoints(
    checkpoints: list[str], request: Request, *, output: Path, console: Console, err: Console, cwd: Path
) -> int:
    data, split = request.data, request.split
    try:
        planned = plan(checkpoints, data, split, output, cwd)
        request = replace(request, data_format=request.data_format or guess_format(data))
    except (InvalidArgument, OSError) as exc:
        err.print(f"[red]error[/red] {exc}", highlight=False)
        return ExitCode.INVALID
    root = output if output.is_absolute() else cwd / output
    root.mkdir(parents=True, exist_ok=True)
    for item in planned:
        console.print(f"[bold]kiln evaluate[/bold] {item.checkpoint} on {data} ({split}) -> {item.output}",
                      highlight=False)  # fmt: skip
    log_path = root / LOG_FILE
    outcomes = run_evaluations(planned, request, log_path, cwd)
    for outcome in outcomes:
        if outcome.code != ExitCode.OK:
            reason = outcome.report.reason if outcome.report is not None and outcome.report.reason else "no report"
            err.print(f"[red]error[/red] {outcome.planned.checkpoint}: {reason} (log: {log_path})", highlight=False)
    done = [outcome for outcome in outcomes if outcome.code == ExitCode.OK]
    if done:
        console.print(comparison_table(done, split))
        where = f"{done[0].planned.output.parent}/<checkpoint>/"
        console.print(f"outputs: {where} (evaluation.json, predictions, pictures)", highlight=False)
    failed = [outcome.code for outcome in outcomes if outcome.code != ExitCode.OK]
    return failed[0] if failed else ExitCode.OK
