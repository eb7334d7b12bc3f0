"""``kiln run FILE``: the cluster's TrainingJob manifest, trained on this machine under torchrun.

The manifest is validated and resolved exactly as the operator would (``mode="local"``, storage under
``./.kiln`` unless the spec names S3), written as the ResolvedTrainingJob JSON the trainer reads, and
handed to ``python -m torch.distributed.run`` in its own process group. Progress comes from rank 0's
``/progress`` endpoint; Ctrl-C becomes SIGTERM for the trainer, which checkpoints and exits, so running
the same command again resumes. Torch-free: everything torch-shaped happens in the child processes.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from kiln.api.manifest import InvalidManifest, load_training_job
from kiln.api.resolve import Environment, ResolvedTrainingJob, resolve

EXIT_OK, EXIT_FAILED, EXIT_INVALID = 0, 1, 2
POLL_SECONDS = 0.5
STATE_DIR = ".kiln"


@dataclass(frozen=True)
class LocalRun:
    job: ResolvedTrainingJob
    spec_path: Path
    termination_log: Path
    port: int

    def command(self) -> list[str]:
        procs = self.job.spec.resources.procs_per_node or 1
        return [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
            "--nproc-per-node", str(procs), "-m", "kiln.trainer", "--spec", str(self.spec_path),
        ]  # fmt: skip

    def environment(self) -> dict[str, str]:
        return {
            **os.environ,
            "KILN_METRICS_PORT": str(self.port),
            "KILN_TERMINATION_LOG": str(self.termination_log),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
            "PYTHONUNBUFFERED": "1",
        }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def prepare(manifest: Path, cwd: Path) -> LocalRun:
    """Validate, resolve and write the spec; InvalidManifest on any problem with the manifest."""
    job = load_training_job(manifest)
    state = (cwd / STATE_DIR).absolute()
    env = Environment(storage_root=str(state), default_procs_per_node=os.cpu_count() or 1)
    resolved = resolve(job, env, mode="local")
    run_dir = state / "runs" / f"{resolved.namespace}-{resolved.name}"
    run_dir.mkdir(parents=True, exist_ok=True)
    spec_path = run_dir / "trainingjob.json"
    spec_path.write_text(resolved.model_dump_json(by_alias=True, indent=1))
    termination_log = run_dir / "termination-log"
    termination_log.unlink(missing_ok=True)
    return LocalRun(resolved, spec_path, termination_log, free_port())


def fetch_progress(port: int) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/progress", timeout=1) as response:
            return json.loads(response.read())
    except (OSError, ValueError):
        return None


def outcome(run: LocalRun, returncode: int) -> tuple[int, dict[str, Any]]:
    """The exit code: the trainer's termination message decides (torchrun turns every failure into 1)."""
    try:
        message = json.loads(run.termination_log.read_text())
    except (OSError, ValueError):
        return (EXIT_FAILED if returncode else EXIT_OK), {}
    if message.get("state") in ("completed", "preempted"):
        return EXIT_OK, message
    return int(message.get("exitCode", EXIT_FAILED)), message


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
        )
        self.epochs: TaskID = self.bars.add_task("epoch", total=None, info="starting torchrun ...")
        self.steps: TaskID = self.bars.add_task("step", total=None, info="")

    def update(self, payload: dict[str, Any]) -> None:
        progress = payload.get("progress", {})
        metrics = progress.get("metrics", {})
        total_epochs = progress.get("totalEpochs") or None
        self.bars.update(self.epochs, completed=progress.get("epoch", 0), total=total_epochs,
                         info=progress.get("metric") or payload.get("state", ""))  # fmt: skip
        step, percent = progress.get("step", 0), progress.get("percent", 0.0)
        total_steps = round(step * 100 / percent) if percent else None
        eta = progress.get("etaSeconds")
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


@contextlib.contextmanager
def sigint_as_sigterm(child: subprocess.Popen[bytes]) -> Iterator[None]:
    """Ctrl-C: SIGTERM to the trainer's process group, once; it checkpoints and exits on its own."""

    def forward(_signum: int, _frame: FrameType | None) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGTERM)

    previous = signal.signal(signal.SIGINT, forward)
    previous_term = signal.signal(signal.SIGTERM, forward)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        signal.signal(signal.SIGTERM, previous_term)


def _pump(stream: Any, console: Console) -> None:
    for line in iter(stream.readline, b""):
        console.print(line.decode(errors="replace").rstrip(), markup=False, highlight=False, soft_wrap=True)


def launch(run: LocalRun, console: Console, cwd: Path) -> int:
    console.print(f"[bold]kiln run[/bold] {run.job.namespace}/{run.job.name}: {run.job.world_size} process(es), "
                  f"outputs in {run.job.run_uri}", highlight=False)  # fmt: skip
    child = subprocess.Popen(
        run.command(), cwd=cwd, env=run.environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    view = ProgressView(console)
    pump = threading.Thread(target=_pump, args=(child.stdout, view.bars.console), daemon=True)
    with sigint_as_sigterm(child), view.bars:
        pump.start()
        while child.poll() is None:
            payload = fetch_progress(run.port)
            if payload is not None:
                view.update(payload)
            time.sleep(POLL_SECONDS)
        pump.join(timeout=5)
        code, message = outcome(run, child.returncode)
        if "progress" in message:
            view.update(message)
    state = message.get("state", "failed")
    if state == "failed":
        console.print(
            f"[red]failed[/red] {message.get('reason', f'torchrun exited {child.returncode}')}", highlight=False
        )
    else:
        checkpoints = message.get("checkpoints", {})
        console.print(f"[green]{state}[/green] latest checkpoint {checkpoints.get('latest')}", highlight=False)
        if state == "preempted":
            console.print("run the same command again to resume", highlight=False)
        if message.get("stopReason"):
            console.print(f"stopped early: {message['stopReason']}", highlight=False)
    return code


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
