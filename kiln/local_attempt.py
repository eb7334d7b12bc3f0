"""One local attempt of ``kiln run``: what to launch (``LocalRun``), the torchrun launchers as processes
(``Attempt``: one process group, output pumped, SIGTERM then SIGKILL), and how it ended (``judge``).

Torch-free: the launchers are ``python -m kiln.trainer.launch`` child processes.
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
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from kiln.api.contract import MALLOC_ENV, Env, ExitCode, TrainerReport, is_retriable_exit, parse_report
from kiln.api.resolve import ResolvedTrainingJob

STDERR_TAIL_LINES = 20


@dataclass(frozen=True)
class LocalRun:
    job: ResolvedTrainingJob
    spec_path: Path
    run_dir: Path
    not_applied: tuple[tuple[str, str], ...] = ()

    def termination_log(self, node: int) -> Path:
        """Each local "node" has its own termination log, as each pod does."""
        return self.run_dir / ("termination-log" if node == 0 else f"termination-log-{node}")

    def command(self, node: int, master_port: int) -> list[str]:
        return [
            sys.executable, "-m", "kiln.trainer.launch",
            "--nnodes", str(self.job.nodes), "--node-rank", str(node), "--nproc-per-node", str(self.job.procs_per_node),
            "--master-addr", "127.0.0.1", "--master-port", str(master_port),
            "-m", "kiln.trainer", "--spec", str(self.spec_path),
        ]  # fmt: skip

    def prometheus_targets(self) -> Path:
        """A Prometheus file_sd file listing every rank's /metrics of the current attempt (rewritten per attempt,
        as the ports change): point a local Prometheus's ``file_sd_configs`` at it."""
        return self.run_dir / "prometheus-targets.json"

    def environment(self, node: int, attempt: int, metrics_ports: list[int]) -> dict[str, str]:
        env = {
            **MALLOC_ENV,  # before os.environ: a user's own malloc tuning wins
            **os.environ,
            # Every rank serves /metrics, and all "nodes" share this host: each rank gets a port of its own.
            Env.METRICS_PORTS: ",".join(str(port) for port in metrics_ports),
            Env.TERMINATION_LOG: str(self.termination_log(node)),
            Env.LOG_STREAM: "stdout",
            Env.ATTEMPT: str(attempt),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
            "PYTHONUNBUFFERED": "1",
            # How long torchrun waits for its workers after forwarding SIGTERM before it SIGKILLs them.
            "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": str(self.job.spec.run_policy.termination_grace_period_seconds),
        }
        if self.job.spec.resources.gpus_per_node == 0:  # "0 trains on CPU", even where CUDA is visible
            env["CUDA_VISIBLE_DEVICES"] = ""
        return env


def free_ports(count: int) -> list[int]:
    """``count`` distinct free TCP ports (held together while chosen, so they differ)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]


def read_report(path: Path) -> TrainerReport | None:
    try:
        return parse_report(path.read_text())
    except OSError:
        return None


def signal_name(code: int) -> str | None:
    """SIGKILL for 137 (128 + 9), None when ``code`` is not a signal's."""
    if code <= 128:
        return None
    try:
        return signal.Signals(code - 128).name
    except ValueError:
        return None


MEANINGS: dict[int, str] = {ExitCode.FAILED: "error", ExitCode.INVALID: "invalid input"}


def exit_label(code: int) -> str:
    """``exit 2, invalid input``: an exit code and what it means."""
    name = signal_name(code)
    meaning = MEANINGS.get(code) or (f"killed by {name}" if name else None)
    return f"exit {code}, {meaning}" if meaning else f"exit {code}"


def _process_table() -> list[tuple[int, int, int]]:
    """(pid, ppid, pgid) of every process: /proc on Linux, ps elsewhere; empty if neither answers."""
    proc = Path("/proc")
    if (proc / "self" / "stat").exists():
        rows = []
        for entry in proc.iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = (entry / "stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue
            rows.append((int(entry.name), int(fields[1]), int(fields[2])))
        return rows
    try:
        listing = subprocess.run(["ps", "-A", "-o", "pid=,ppid=,pgid="], capture_output=True, text=True,
                                 timeout=10, check=False).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return []
    return [(int(a), int(b), int(c)) for a, b, c in (line.split() for line in listing.splitlines() if line.strip())]


def descendant_groups(roots: list[int]) -> set[int]:
    """Process groups of every descendant of ``roots``: torchrun starts each worker in a session of its own."""
    table = _process_table()
    children: dict[int, list[int]] = {}
    group = {}
    for pid, ppid, pgid in table:
        children.setdefault(ppid, []).append(pid)
        group[pid] = pgid
    groups, todo = set(), list(roots)
    while todo:
        pid = todo.pop()
        if pid in group:
            groups.add(group[pid])
        todo.extend(children.get(pid, ()))
    return groups


class Attempt:
    """One attempt: ``resources.nodes`` torchrun launchers in one process group, their output pumped.

    stdout (the trainer's log lines, KILN_LOG_STREAM=stdout) streams to the console; stderr (the launchers'
    own lines, stray warnings) is only kept as a tail, shown when a failure comes without the trainer's report.
    """

    def __init__(self, run: LocalRun, number: int, show: Callable[[str], object], cwd: Path) -> None:
        self.run, self.number = run, number
        master_port, *rank_ports = free_ports(1 + run.job.nodes * run.job.procs_per_node)
        self.metrics_port = rank_ports[0]  # global rank 0's, which also serves /progress
        per_node = run.job.procs_per_node
        node_ports = [rank_ports[node * per_node : (node + 1) * per_node] for node in range(run.job.nodes)]
        targets = [{"targets": [f"127.0.0.1:{port}" for port in rank_ports]}]
        run.prometheus_targets().write_text(json.dumps(targets, indent=1))
        for node in range(run.job.nodes):
            run.termination_log(node).unlink(missing_ok=True)
        self.stderr_tail: deque[str] = deque(maxlen=STDERR_TAIL_LINES)
        out_read, out_write = os.pipe()
        err_read, err_write = os.pipe()
        self.launchers: list[subprocess.Popen[bytes]] = []
        try:
            for node in range(run.job.nodes):
                # The first launcher leads a new process group (outside the terminal's foreground group, so
                # Ctrl-C reaches only kiln run); the others join it, so one killpg reaches every launcher.
                group = 0 if node == 0 else self.launchers[0].pid
                command, env = run.command(node, master_port), run.environment(node, number, node_ports[node])
                self.launchers.append(
                    subprocess.Popen(
                        command,
                        cwd=cwd,
                        env=env,
                        stdin=subprocess.DEVNULL,
                        stdout=out_write,
                        stderr=err_write,
                        process_group=group,
                    )
                )
        except BaseException:
            if self.launchers:
                self.signal(signal.SIGKILL)
            raise
        finally:
            os.close(out_write)
            os.close(err_write)
        self.pumps = [
            threading.Thread(target=self._pump, args=(os.fdopen(out_read, "rb"), show), daemon=True),
            threading.Thread(target=self._pump, args=(os.fdopen(err_read, "rb"), self.stderr_tail.append), daemon=True),
        ]
        for pump in self.pumps:
            pump.start()
        self.exits: list[tuple[int, int]] = []  # (node, exit code) in the order they were seen
        self.terminated_at: float | None = None
        self.killed = False
        self.groups: set[int] = set()

    @staticmethod
    def _pump(stream: IO[bytes], sink: Callable[[str], object]) -> None:
        with stream:
            for line in iter(stream.readline, b""):
                sink(line.decode(errors="replace").rstrip())

    @property
    def pgid(self) -> int:
        return self.launchers[0].pid

    def running(self) -> bool:
        """Record the launchers that exited since the last look; True while any runs."""
        for node, launcher in enumerate(self.launchers):
            code = launcher.poll()
            if code is not None and all(seen != node for seen, _ in self.exits):
                self.exits.append((node, 128 - code if code < 0 else code))
        return len(self.exits) < len(self.launchers)

    @property
    def failed(self) -> list[tuple[int, int]]:
        return [(node, code) for node, code in self.exits if code != 0]

    def signal(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pgid, sig)

    def terminate(self) -> None:
        """SIGTERM the launchers, once: each forwards it to its workers, which checkpoint and exit."""
        if self.terminated_at is None:
            self.terminated_at = time.monotonic()
            self.groups |= descendant_groups([launcher.pid for launcher in self.launchers])
            self.signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL the launchers and every worker (each in a session of its own), whatever is left of them."""
        self.killed = True
        groups = self.groups | descendant_groups([launcher.pid for launcher in self.launchers]) | {self.pgid}
        for group in groups - {os.getpgrp()}:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(group, signal.SIGKILL)

    def finish(self) -> None:
        for launcher in self.launchers:
            launcher.wait()
        self.running()
        for pump in self.pumps:
            pump.join(timeout=5)

    def report(self, node: int = 0) -> TrainerReport | None:
        return read_report(self.run.termination_log(node))


@dataclass(frozen=True)
class Verdict:
    """How an attempt ended: ``code`` is the trainer's exit code (128 + n for a signal), ``report`` the one
    that explains it (rank 0's when the attempt succeeded, the failing node's otherwise)."""

    code: int
    report: TrainerReport | None
    reason: str
    retriable: bool = False

    @property
    def ok(self) -> bool:
        return self.code == 0 and not self.retriable


def judge(attempt: Attempt, retriable_exit_codes: list[int]) -> Verdict:
    """The operator's rule (docs/operations.md, Failure classes), on local processes: the earliest failed
    node is the cause; its trainer's exit code counts unless the launcher died by a signal."""
    rank0 = attempt.report(0)
    if not attempt.failed:
        if rank0 is not None and rank0.state == "preempted":
            return Verdict(0, rank0, "the trainer was preempted (SIGTERM) and saved a checkpoint", retriable=True)
        return Verdict(0, rank0, "")
    node, code = attempt.failed[0]
    report = attempt.report(node)
    if report is not None and report.exit_code and code < 128:
        code = int(report.exit_code)
    where = f"node {node}: " if len(attempt.launchers) > 1 else ""
    if report is not None and report.state == "failed" and report.reason:
        reason = report.reason
    else:
        name = signal_name(code)
        reason = f"{where}the trainer was killed by {name}" if name else f"{where}the trainer exited with code {code}"
    return Verdict(code, report, reason, retriable=is_retriable_exit(code, retriable_exit_codes))
