"""``kiln run FILE``: the cluster's TrainingJob manifest, trained on this machine under torchrun.

The manifest is validated and resolved exactly as the operator would (``mode="local"``, storage under
``./.kiln`` unless the spec names S3), checked by :mod:`kiln.preflight` (local inputs exist, the S3 endpoint
answers), written as the ResolvedTrainingJob JSON the trainer reads, and trained by ``resources.nodes``
torchrun launchers (``python -m kiln.trainer.launch``, torchrun without its tracebacks), one per "node", all
in one process group. runPolicy applies as in a cluster: a retriable failure (a signal, a report of
"preempted", a listed exit code) restarts the whole gang up to maxRestarts times, each restart resuming from
the latest checkpoint; activeDeadlineSeconds counts from the first start; SIGTERM (the deadline, Ctrl-C) gets
terminationGracePeriodSeconds to checkpoint before SIGKILL. Fields with no local effect are named before
training starts. Progress comes from global rank 0's ``/progress``; the outcome from the trainer's report
(its termination message). Torch-free: everything torch-shaped happens in the child processes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Literal

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from kiln.api.contract import ExitCode, TrainerReport, parse_report
from kiln.api.manifest import InvalidManifest
from kiln.api.parse import load_training_job
from kiln.api.resolve import Environment, resolve
from kiln.local_attempt import Attempt, LocalRun, Verdict, exit_label, judge
from kiln.preflight import not_applied_locally, preflight

EXIT_OK, EXIT_FAILED, EXIT_INVALID = ExitCode.OK, ExitCode.FAILED, ExitCode.INVALID
EXIT_INTERRUPTED = 130  # Ctrl-C before the trainer could report anything (the shell's 128 + SIGINT)
STATE_DIR = ".kiln"
POLL_SECONDS = 0.1
PROGRESS_SECONDS = 0.5
# Each launcher SIGKILLs its own workers once the grace period is over (TORCH_ELASTIC_SHUTDOWN_TIMEOUT); kiln run
# kills whatever is still left of the gang this much later.
KILL_MARGIN_SECONDS = 5.0

StopCause = Literal["interrupted", "deadline"]


def prepare(manifest: Path, cwd: Path) -> LocalRun:
    """Validate, resolve, pre-flight and write the spec; InvalidManifest on any problem found before launch."""
    job = load_training_job(manifest)
    state = (cwd / STATE_DIR).absolute()
    env = Environment(storage_root=str(state), default_procs_per_node=os.cpu_count() or 1)
    resolved = resolve(job, env, mode="local")
    errors = preflight(resolved, str(manifest), cwd)
    if errors:
        raise InvalidManifest(errors)
    run_dir = state / "runs" / f"{resolved.namespace}-{resolved.name}"
    run_dir.mkdir(parents=True, exist_ok=True)
    spec_path = run_dir / "trainingjob.json"
    spec_path.write_text(resolved.model_dump_json(by_alias=True, indent=1))
    return LocalRun(resolved, spec_path, run_dir, tuple(not_applied_locally(job.spec)))


def fetch_progress(port: int) -> TrainerReport | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/progress", timeout=1) as response:
            return parse_report(response.read().decode(errors="replace"))
    except (OSError, ValueError):
        return None


class ProgressView:
    """Two rich bars (epochs and optimizer steps) with loss, throughput and ETA."""

    def __init__(self, console: Console) -> None:
        self.bars = Progress(
            TextColumn("[bold]{task.description:<6}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            console=console,
            # rich's default is 10 redraws a second from a thread of its own, whether or not anything changed
            # (and even when stdout is not a terminal): the bars' data changes every PROGRESS_SECONDS.
            refresh_per_second=2,
        )
        self.epochs: TaskID = self.bars.add_task("epoch", total=None, info="starting torchrun ...")
        self.steps: TaskID = self.bars.add_task("step", total=None, info="")

    def say(self, text: str) -> None:
        """A line of kiln run's own (rich markup), above the bars."""
        self.bars.console.print(text, highlight=False)

    def say_raw(self, line: str) -> None:
        """A line of the trainer's, verbatim, above the bars."""
        self.bars.console.print(line, markup=False, highlight=False, soft_wrap=True)

    def update(self, report: TrainerReport) -> None:
        progress = report.progress
        if progress is None:
            return
        metrics = progress.metrics
        self.bars.update(self.epochs, completed=progress.epoch, total=progress.total_epochs or None,
                         info=progress.metric or report.state)  # fmt: skip
        step, percent = progress.step, progress.percent
        total_steps = round(step * 100 / percent) if percent else None
        eta = progress.eta_seconds
        info = "  ".join(
            part
            for part in (
                f"loss {metrics['train/loss']:.4f}" if "train/loss" in metrics else "",
                f"{metrics['train/images_per_sec']:.0f} img/s" if "train/images_per_sec" in metrics else "",
                f"eta {int(eta) // 60}m{int(eta) % 60:02d}s" if eta is not None else "",
            )
            if part
        )
        self.bars.update(self.steps, completed=step, total=total_steps, info=info)


class Supervisor:
    """Runs attempts until one succeeds, fails for good, the deadline passes or the user stops it."""

    def __init__(self, run: LocalRun, console: Console, cwd: Path) -> None:
        self.run, self.console, self.cwd = run, console, cwd
        self.policy = run.job.spec.run_policy
        self.attempt: Attempt | None = None
        self.stop: StopCause | None = None
        self.force = False
        self.deadline: float | None = None

    @contextlib.contextmanager
    def signals(self) -> Iterator[None]:
        """Ctrl-C (or SIGTERM to kiln run): stop, giving the trainer its grace period; a second one: SIGKILL."""

        def stop(_signum: int, _frame: FrameType | None) -> None:
            if self.stop is None:
                self.stop = "interrupted"
            else:
                self.force = True

        previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def watch(self, attempt: Attempt, view: ProgressView) -> None:
        grace = self.policy.termination_grace_period_seconds
        next_progress = 0.0
        while attempt.running():
            now = time.monotonic()
            if self.deadline is not None and now >= self.deadline and self.stop is None:
                self.stop = "deadline"
            # A stop, or a failed node (in a cluster the Job fails and the other pods get SIGTERM): end the gang.
            if self.stop is not None or attempt.failed:
                attempt.terminate()
            overdue = attempt.terminated_at is not None and now > attempt.terminated_at + grace + KILL_MARGIN_SECONDS
            if (self.force or overdue) and not attempt.killed:
                attempt.kill()
            if now >= next_progress:
                next_progress = now + PROGRESS_SECONDS
                if (report := fetch_progress(attempt.metrics_port)) is not None:
                    view.update(report)
            time.sleep(POLL_SECONDS)
        attempt.finish()

    def supervise(self, view: ProgressView) -> tuple[Verdict | None, int]:
        """(the last attempt's verdict, restarts made); the verdict is None when no attempt ran at all."""
        started = time.monotonic()
        if self.policy.active_deadline_seconds is not None:
            self.deadline = started + self.policy.active_deadline_seconds
        verdict: Verdict | None = None
        restarts = 0
        for number in range(1, self.policy.max_restarts + 2):
            if self.deadline is not None and time.monotonic() >= self.deadline and self.stop is None:
                self.stop = "deadline"
            if self.stop is not None:
                break
            self.attempt = Attempt(self.run, number, view.say_raw, self.cwd)
            self.watch(self.attempt, view)
            verdict = judge(self.attempt, self.policy.retriable_exit_codes)
            if verdict.report is not None:
                view.update(verdict.report)
            if self.stop is not None or not verdict.retriable or number > self.policy.max_restarts:
                break
            restarts += 1
            view.say(f"[yellow]restart {restarts}/{self.policy.max_restarts}[/yellow]: {verdict.reason}")
            view.bars.update(view.epochs, info=f"restart {restarts}: starting torchrun ...")
        return verdict, restarts

    def outcome(self, verdict: Verdict | None) -> int:
        """Print how the run ended; the exit code (docs/operations.md, `kiln run`)."""

        def say(text: str) -> None:
            self.console.print(text, highlight=False)

        report = verdict.report if verdict is not None else None
        if report is not None and report.finished_cleanly:
            latest = report.checkpoints.latest if report.checkpoints is not None else None
            say(f"[green]{report.state}[/green] latest checkpoint {latest}")
            if report.stop_reason:
                say(f"stopped early: {report.stop_reason}")
            if report.state == "completed":
                return EXIT_OK
        if self.stop == "deadline":
            seconds = self.policy.active_deadline_seconds
            say(f"[red]deadline exceeded[/red]: runPolicy.activeDeadlineSeconds ({seconds}s)")
            return ExitCode.DEADLINE
        if verdict is None:
            say("[red]interrupted[/red] before the trainer started")
            return EXIT_INTERRUPTED
        failed = report is not None and report.state == "failed"
        if self.stop == "interrupted" and not failed:
            if report is not None:  # preempted: it saved a checkpoint
                say("run the same command again to resume")
                return EXIT_OK
            say("[red]interrupted[/red] before the trainer saved a checkpoint")
            return EXIT_INTERRUPTED
        if verdict.ok:
            if report is None:
                say("[green]completed[/green] (the trainer left no report)")
            return EXIT_OK
        if not verdict.retriable or report is None or not report.finished_cleanly:
            if not failed and self.attempt is not None:  # no reason from the trainer: the launchers' last words
                for line in self.attempt.stderr_tail:
                    self.console.print(line, markup=False, highlight=False, style="dim")
            say(f"[red]failed[/red] ({exit_label(verdict.code)}): {verdict.reason}")
        if verdict.retriable:
            say(f"[red]restart limit reached[/red]: runPolicy.maxRestarts ({self.policy.max_restarts})")
            return EXIT_FAILED
        return verdict.code if 0 < verdict.code < 128 else EXIT_FAILED


def launch(run: LocalRun, console: Console, cwd: Path) -> int:
    """Train ``run`` under runPolicy (restarts, deadline, grace period); the exit code (see docs/operations.md)."""
    job = run.job
    console.print(f"[bold]kiln run[/bold] {job.namespace}/{job.name}: {job.nodes} node(s) x {job.procs_per_node} "
                  f"process(es) = world size {job.world_size}, outputs in {job.run_uri}", highlight=False)  # fmt: skip
    if run.not_applied:
        fields = "; ".join(f"{path} ({reason})" for path, reason in run.not_applied)
        console.print(f"[yellow]not applied locally[/yellow]: {fields}", highlight=False)
    supervisor = Supervisor(run, console, cwd)
    view = ProgressView(console)
    with supervisor.signals(), view.bars:
        verdict, _ = supervisor.supervise(view)
    return supervisor.outcome(verdict)


def run_manifest(manifest: Path, *, cwd: Path | None = None, console: Console | None = None) -> int:
    """Validate, resolve and train ``manifest`` locally; returns the exit code."""
    console = console or Console()
    cwd = cwd or Path.cwd()
    try:
        run = prepare(manifest, cwd)
    except InvalidManifest as exc:
        for error in exc.errors:
            console.print(f"[red]error[/red] {error}", highlight=False)
        return EXIT_INVALID
    return launch(run, console, cwd)
