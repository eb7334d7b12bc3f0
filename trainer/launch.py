"""``python -m kiln.trainer.launch <torchrun arguments>``: torchrun for ``kiln run``, minus torchrun's noise.

It runs ``torch.distributed.run``'s own entry (``parse_args`` + ``run``) in this process, so every torchrun
flag works unchanged, but a failed worker does not end in torchrun's ``ChildFailedError`` traceback and the
elastic agent's log lines ("Sending process ... closing signal", "failed (exitcode: 2) local_rank: ...").
Instead the launcher exits with the code of the worker that failed first (128 + n for a signal, like a
container), after one line on stderr saying which rank it was. The trainer's own report (its termination
message) is what ``kiln run`` shows; this line is only a fallback for a worker that died without one.

Set ``LOGLEVEL`` (torch's own knob for the elastic agent's loggers) to see the agent's logging again.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

from kiln.api.contract import ExitCode

CPP_LOG_LEVEL = "TORCH_CPP_LOG_LEVEL"


def quiet_import() -> None:
    """Import torchrun with its logging silenced: the launcher process runs only torch's elastic agent (the
    trainer is its child processes), so nothing it logs is kiln's. ``torch.distributed`` logs through a
    stderr handler of its own (not propagated); a filter on it drops every record, including those of loggers
    created later, and a NullHandler on the root logger keeps Python's last-resort handler out. c10's C++
    warnings (a TCPStore peer that went away) are turned off for this process only: the workers inherit the
    environment as it was."""
    previous = os.environ.get(CPP_LOG_LEVEL)
    os.environ[CPP_LOG_LEVEL] = "ERROR"
    try:
        import torch.distributed.run  # noqa: F401 (installs torch's logging handlers)
    finally:
        if previous is None:
            del os.environ[CPP_LOG_LEVEL]
        else:
            os.environ[CPP_LOG_LEVEL] = previous
    logging.getLogger().addHandler(logging.NullHandler())
    for name in ("torch", "torch.distributed"):
        for handler in logging.getLogger(name).handlers:
            handler.addFilter(lambda _record: False)


def exit_code_of(worker_exitcode: int) -> int:
    """A worker's exit code as a shell (or the kubelet) reports it: a signal n is 128 + n."""
    return 128 - worker_exitcode if worker_exitcode < 0 else worker_exitcode


def describe(rank: int, code: int) -> str:
    if code > 128:
        try:
            return f"rank {rank} was killed by {signal.Signals(code - 128).name} (exit {code})"
        except ValueError:
            pass
    return f"rank {rank} exited with code {code}"


def main(argv: list[str] | None = None) -> int:
    if "LOGLEVEL" not in os.environ:
        quiet_import()
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        run(args)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        code = exit_code_of(failure.exitcode)
        print(f"kiln.trainer.launch: {describe(rank, code)}", file=sys.stderr, flush=True)
        return code
    except SignalException as exc:
        # SIGTERM/SIGINT reached the launcher: the agent forwarded it to the workers and waited for them
        # (up to TORCH_ELASTIC_SHUTDOWN_TIMEOUT); they checkpointed and reported. Exit as the signal would.
        return 128 + int(exc.sigval)
    except Exception as exc:  # rendezvous timeouts, a port in use: the launcher itself failed
        print(f"kiln.trainer.launch: torchrun failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return ExitCode.FAILED
    return ExitCode.OK


if __name__ == "__main__":
    from kiln.trainer.exiting import exit_process

    exit_process(main())
