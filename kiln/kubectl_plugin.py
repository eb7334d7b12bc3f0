"""``kubectl kiln``: a kubectl plugin for TrainingJobs (installed as the ``kubectl-kiln`` entry point).

    kubectl kiln logs NAME [-f] [--rank N] [--attempt K]   every worker's log, each line prefixed [node N]
    kubectl kiln watch NAME                                the live progress bars of `kiln run`, from the status
    kubectl kiln stop NAME                                 checkpoint, evaluate the best checkpoint, end Stopped
    kubectl kiln checkpoint NAME [--token T] [--no-wait]   save a checkpoint at the next step boundary
    kubectl kiln suspend|resume NAME                       spec.runPolicy.suspend

The same commands are ``kiln``'s too (``kiln watch NAME -n NS``; :func:`add_commands_to`).

Everything goes through kubectl (``kiln.kubectl``) and the TrainingJob's own API: annotations for stop and
checkpoint (kiln.api.contract.Annotation), which the operator passes on to rank 0. Exit codes: 0 done, 1 failed
(kubectl failed, the job Failed under ``watch``, a checkpoint not acknowledged in time), 2 invalid input (no such
TrainingJob, a bad flag).
"""

from __future__ import annotations

import functools
import heapq
import inspect
import re
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated, Any

import typer

from kiln.api import contract
from kiln.api.contract import Annotation, ExitCode, Label, TrainerReport
from kiln.api.status import MAX_CONTROL_TOKEN, TERMINAL_PHASES, Phase
from kiln.console import LazyConsole
from kiln.kubectl import Kubectl, KubectlError, lines_of

EXIT_OK, EXIT_FAILED, EXIT_INVALID = ExitCode.OK, ExitCode.FAILED, ExitCode.INVALID
Obj = dict[str, Any]
TERMINAL = {phase.value for phase in TERMINAL_PHASES}

app = typer.Typer(
    name="kubectl kiln",
    help="Kiln's kubectl plugin: logs, progress and control of TrainingJobs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = LazyConsole(highlight=False)
err = LazyConsole(stderr=True, highlight=False, soft_wrap=True)
Name = Annotated[str, typer.Argument(help="The TrainingJob's name.")]


class State:
    kubectl = Kubectl()


Namespace = Annotated[str | None, typer.Option("-n", "--namespace", help="The namespace (kubectl's).")]
Context = Annotated[str | None, typer.Option(help="The kubeconfig context (kubectl's).")]
Kubeconfig = Annotated[str | None, typer.Option(help="The kubeconfig file (kubectl's).")]


@app.callback()
def _globals(namespace: Namespace = None, context: Context = None, kubeconfig: Kubeconfig = None) -> None:
    """Kiln's kubectl plugin: logs, progress and control of TrainingJobs."""
    State.kubectl = Kubectl(namespace=namespace, context=context, kubeconfig=kubeconfig)


def add_commands_to(target: typer.Typer, panel: str) -> None:
    """Give another CLI (``kiln``) these commands, as ``kiln logs NAME -n NS``. There no plugin callback takes the
    cluster options first, so each command takes them itself."""
    for info in app.registered_commands:
        assert info.callback is not None
        target.command(info.name, rich_help_panel=panel)(_with_cluster_options(info.callback))


def _with_cluster_options(command: Callable[..., None]) -> Callable[..., None]:
    """``command`` with -n/--namespace, --context and --kubeconfig added to what typer reads off its signature."""

    @functools.wraps(command)
    def with_options(*args: Any, namespace: str | None, context: str | None, kubeconfig: str | None,
                     **kwargs: Any) -> None:  # fmt: skip
        _globals(namespace, context, kubeconfig)
        command(*args, **kwargs)

    signature = inspect.signature(command, eval_str=True)
    cluster_options = (("namespace", Namespace), ("context", Context), ("kubeconfig", Kubeconfig))
    options = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=hint)
               for name, hint in cluster_options]  # fmt: skip
    with_options.__signature__ = signature.replace(parameters=[*signature.parameters.values(), *options])  # type: ignore[attr-defined]
    return with_options


def fail(message: str, code: int = EXIT_FAILED) -> typer.Exit:
    err.print(f"[red]error[/red] {message}")
    return typer.Exit(code)


def get_job(name: str) -> Obj:
    try:
        return State.kubectl.trainingjob(name)
    except KubectlError as exc:
        raise fail(f"NAME: {exc}", EXIT_INVALID if exc.not_found else EXIT_FAILED) from None


def call(action: str, *args: Any) -> None:
    try:
        getattr(State.kubectl, action)(*args)
    except KubectlError as exc:
        raise fail(str(exc), EXIT_INVALID if exc.not_found else EXIT_FAILED) from None


def phase_of(job: Obj) -> str:
    return str((job.get("status") or {}).get("phase") or Phase.PENDING.value)


# -- control ----------------------------------------------------------------------------------------------------
@app.command()
def stop(name: Name) -> None:
    """Stop gracefully: checkpoint at the next step boundary, evaluate the best checkpoint, end Succeeded with
    reason Stopped."""
    phase = phase_of(get_job(name))
    if phase in TERMINAL:
        out.print(f"{name} is {phase} already: nothing to stop")
        return
    call("annotate", name, Annotation.STOP, Annotation.STOP_VALUE)
    later = " once it runs" if phase != Phase.RUNNING.value else ""
    out.print(f"stop requested for {name}{later}: it checkpoints, evaluates the best checkpoint and ends Stopped")


@app.command()
def checkpoint(
    name: Name,
    token: Annotated[str | None, typer.Option(help="The request's token (default: the time now).")] = None,
    wait: Annotated[bool, typer.Option(help="Wait for the trainer to acknowledge it and print the checkpoint.")] = True,
    timeout: Annotated[float, typer.Option(help="Seconds to wait.")] = 600.0,
) -> None:
    """Save a checkpoint at the next step boundary; status.control acknowledges the token with the checkpoint."""
    token = token or datetime.now(UTC).strftime("%Y-%m-%dT%H.%M.%S.%fZ")
    if not 0 < len(token) <= MAX_CONTROL_TOKEN:
        raise fail(f"--token: at most {MAX_CONTROL_TOKEN} characters", EXIT_INVALID)
    get_job(name)
    call("annotate", name, Annotation.CHECKPOINT, token)
    out.print(f"checkpoint {token} requested for {name}")
    if not wait:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = get_job(name)
        control = (job.get("status") or {}).get("control") or {}
        if control.get("checkpointAcknowledged") == token:
            out.print(f"saved at step {control.get('checkpointStep')}: {control.get('checkpoint')}")
            return
        if phase_of(job) in TERMINAL:
            raise fail(f"{name} is {phase_of(job)}: it ended before the request reached it")
        time.sleep(1.0)
    raise fail(f"not acknowledged within {timeout:g}s (is {name} Running? see kubectl kiln watch {name})")


def _suspend(name: str, suspend: bool) -> None:
    get_job(name)
    call("merge_patch", name, {"spec": {"runPolicy": {"suspend": suspend}}})


@app.command()
def suspend(name: Name) -> None:
    """Suspend (spec.runPolicy.suspend: true): the pods get SIGTERM, checkpoint and go."""
    _suspend(name, True)
    out.print(f"{name} suspended: its pods checkpoint and stop; `kubectl kiln resume {name}` continues it")


@app.command()
def resume(name: Name) -> None:
    """Resume a suspended job (spec.runPolicy.suspend: false): a new attempt continues from the latest
    checkpoint."""
    _suspend(name, False)
    out.print(f"{name} resumed: a new attempt continues from the latest checkpoint")


# -- progress ---------------------------------------------------------------------------------------------------
def report_of(status: Obj) -> TrainerReport:
    """The status in the shape `kiln run`'s progress bars read."""
    state = {Phase.SUCCEEDED.value: "completed", Phase.FAILED.value: "failed"}.get(status.get("phase", ""), "running")
    return TrainerReport.model_validate(
        {"state": state, "progress": status.get("progress"), "checkpoints": status.get("checkpoints")}
    )


def outcome_line(name: str, status: Obj) -> str:
    phase = status.get("phase", "")
    condition: Obj = next((c for c in status.get("conditions") or [] if c.get("type") == phase), {})
    best = (status.get("checkpoints") or {}).get("best")
    parts = [f"{name} {phase} ({condition.get('reason', '')}): {condition.get('message', '')}"]
    if best:
        parts.append(f"best checkpoint {best}")
    return "; ".join(parts)


@app.command()
def watch(
    name: Name,
    interval: Annotated[float, typer.Option(help="Seconds between reads of the status.")] = 2.0,
) -> None:
    """Live progress bars (epoch, step, loss, ETA, metric) from the status, until the job finishes. Exit 0 when it
    succeeds, 1 when it fails."""
    from kiln.local import ProgressView  # here, not at the top: every `kiln` command loads this module

    view = ProgressView(out.console)
    seen: tuple[str, int] | None = None
    with view.bars:
        while True:
            status = get_job(name).get("status") or {}
            phase, attempt = status.get("phase", Phase.PENDING.value), int(status.get("attempt") or 0)
            if (phase, attempt) != seen:
                seen = (phase, attempt)
                view.say(f"{name}: {phase}" + (f" (attempt {attempt})" if attempt else ""))
            view.update(report_of(status))
            if phase in TERMINAL:
                break
            time.sleep(interval)
    out.print(outcome_line(name, status))
    raise typer.Exit(EXIT_OK if phase == Phase.SUCCEEDED.value else EXIT_FAILED)


# -- logs -------------------------------------------------------------------------------------------------------
STAMP = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d) ")


def split_stamp(line: str) -> tuple[str | None, str]:
    """(a sortable key, the text) of a ``kubectl logs --timestamps`` line; (None, line) when it has no stamp."""
    match = STAMP.match(line)
    if match is None:
        return None, line
    # RFC 3339 with trailing zeros trimmed does not sort as text ("...00Z" after "...00.5Z"): pad the fraction.
    return f"{match.group(1)}.{(match.group(2) or '').ljust(9, '0')}{match.group(3)}", line[match.end() :]


def node_of(pod: Obj) -> int:
    meta = pod.get("metadata") or {}
    index = (meta.get("labels") or {}).get(Label.COMPLETION_INDEX) or (meta.get("annotations") or {}).get(
        Label.COMPLETION_INDEX
    )
    return int(index or 0)


def worker_pods(name: str, attempt: int | None, rank: int | None) -> list[tuple[int, str]]:
    """(node rank, pod name) of the attempt's pods, in node order."""
    status = get_job(name).get("status") or {}
    attempt = attempt if attempt is not None else int(status.get("attempt") or 0)
    if attempt < 1:
        raise fail(f"{name} has started no attempt yet (phase {status.get('phase', 'Pending')})")
    try:
        pods = State.kubectl.pods(f"{Label.TRAINING_JOB}={name},{Label.ATTEMPT}={attempt}")
    except KubectlError as exc:
        raise fail(str(exc)) from None
    found = sorted((node_of(pod), pod["metadata"]["name"]) for pod in pods)
    chosen = [(node, pod) for node, pod in found if rank is None or node == rank]
    if not chosen:
        which = f"node rank {rank} of " if rank is not None else ""
        raise fail(f"no pods for {which}attempt {attempt} of {name} (the attempt's pods are gone, or not created)")
    return chosen


def print_merged(pods: list[tuple[int, str]]) -> None:
    """Each pod's whole log, interleaved by kubectl's timestamps (a line without one follows the line before)."""
    streams = []
    for node, pod in pods:
        try:
            text = State.kubectl.run("logs", pod, "-c", contract.CONTAINER_NAME, "--timestamps")
        except KubectlError as exc:
            err.print(f"[yellow][node {node}][/yellow] {exc}")
            continue
        lines, key = [], ""
        for raw in text.splitlines():
            stamp, line = split_stamp(raw)
            key = stamp or key
            lines.append((key, node, f"[node {node}] {line}"))
        streams.append(lines)
    for _, _, line in heapq.merge(*streams, key=lambda entry: entry[0]):
        sys.stdout.write(line + "\n")


def follow(pods: list[tuple[int, str]]) -> int:
    """Every pod's log as it grows, line by line, until every stream ends; the number of streams that failed."""
    lock, failures = threading.Lock(), []

    def pump(node: int, pod: str) -> None:
        process = State.kubectl.stream("logs", "-f", pod, "-c", contract.CONTAINER_NAME)
        for line in lines_of(process):
            with lock:
                sys.stdout.write(f"[node {node}] {line}\n")
                sys.stdout.flush()
        assert process.stderr is not None
        reason = process.stderr.read().strip()
        if process.wait() != 0:
            failures.append(node)
            with lock:
                err.print(f"[yellow][node {node}][/yellow] {reason.splitlines()[-1] if reason else 'kubectl failed'}")

    threads = [threading.Thread(target=pump, args=pod, daemon=True) for pod in pods]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return len(failures)


@app.command()
def logs(
    name: Name,
    follow_logs: Annotated[bool, typer.Option("-f", "--follow", help="Stream the logs as they grow.")] = False,
    rank: Annotated[int | None, typer.Option(help="Only this worker: its node rank (the pod's index).")] = None,
    attempt: Annotated[int | None, typer.Option(help="This attempt's pods (default: the current attempt).")] = None,
) -> None:
    """Every worker pod's log, each line prefixed with its node rank: interleaved by time, or as they come with -f.
    A pod runs procsPerNode ranks; the trainer's own lines name the global rank ([rank R])."""
    pods = worker_pods(name, attempt, rank)
    if follow_logs:
        if follow(pods):
            raise typer.Exit(EXIT_FAILED)
        return
    print_merged(pods)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
