"""Entry point: ``torchrun ... -m kiln.trainer --spec /etc/kiln/trainingjob.json``.

Reads the ResolvedTrainingJob, joins the process group, serves /metrics on every rank and /progress on rank 0,
trains, and turns the outcome into an exit code and a termination message (see ``kiln.trainer.errors``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from pydantic import ValidationError

from kiln.api import contract
from kiln.api.contract import Env, ExitCode, TrainerReport
from kiln.api.resolve import ResolvedTrainingJob
from kiln.storage import NoSpaceError
from kiln.trainer.control import ControlState
from kiln.trainer.data import as_source_uris
from kiln.trainer.distributed import barrier, close_distributed, init_distributed
from kiln.trainer.errors import InvalidInput, one_line
from kiln.trainer.observability import StatusServer, TrainerMetrics, rank_labels, status_port
from kiln.trainer.preemption import PreemptionFlag
from kiln.trainer.progress import LatestSnapshot, write_termination_log
from kiln.trainer.tracking import Tracking

log = logging.getLogger("kiln.trainer")


def load_spec(path: Path) -> ResolvedTrainingJob:
    try:
        return ResolvedTrainingJob.model_validate_json(path.read_bytes())
    except OSError as exc:
        raise InvalidInput(f"--spec {path}: {exc.strerror}") from exc
    except ValidationError as exc:
        raise InvalidInput(f"--spec {path}: not a ResolvedTrainingJob: {exc.errors()[0]['msg']}") from exc


def serve_status(
    port: int, metrics: TrainerMetrics, progress: LatestSnapshot | None, control: ControlState | None = None
) -> StatusServer | None:
    if not port:
        return None
    try:
        return StatusServer(port, metrics, progress, control=control).start()
    except OSError as exc:
        log.warning("cannot serve metrics on port %d: %s", port, exc)
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kiln.trainer", description=__doc__)
    parser.add_argument("--spec", type=Path, required=True, help="ResolvedTrainingJob as JSON")
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    # Rank 0 narrates; the other ranks speak up only for warnings and errors.
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
        stream=sys.stdout if os.environ.get(Env.LOG_STREAM) == "stdout" else sys.stderr,
    )
    termination_log = os.environ.get(Env.TERMINATION_LOG, contract.TERMINATION_LOG)
    preemption = PreemptionFlag()
    preemption.install()
    server: StatusServer | None = None
    tracking = Tracking()
    try:
        from kiln.trainer.trainer import Trainer

        job = load_spec(args.spec)
        world = init_distributed()
        node_rank = int(os.environ.get("GROUP_RANK", "0"))  # torchrun's name for the node rank
        labels = rank_labels(job.namespace, job.name, world.rank, node_rank)
        metrics = TrainerMetrics(labels, restarts=max(int(os.environ.get(Env.ATTEMPT, "1")) - 1, 0))
        progress, control = LatestSnapshot(), ControlState()
        # Every rank serves /metrics (a straggler's step times are its own), global rank 0 first: where pods share
        # a host (hostNetwork, the tests' local executor) another pod's local rank 0 wants the same port, and the
        # operator polls rank 0's /progress there.
        port = status_port(world.local_rank)
        if world.is_main:
            server = serve_status(port, metrics, progress, control)
        barrier()
        if not world.is_main:
            server = serve_status(port, metrics, None)
        trainer = Trainer(job, world, preemption=preemption, reporter=progress, metrics=metrics, control=control)
        tracking = trainer.tracking
        state = trainer.train()
        if world.is_main:
            write_termination_log(termination_log, trainer.snapshot().to_json())
        where = tracking.where()
        work = "evaluation" if job.spec.epochs == 0 else "training"  # epochs 0 evaluates checkpoint.resume
        log.info("%s %s at epoch %d, step %d%s", work, state, trainer.epoch, trainer.step, where and f"; {where}")
        return ExitCode.OK
    except Exception as exc:
        code = ExitCode.INVALID if isinstance(exc, InvalidInput) else ExitCode.FAILED
        reason = as_source_uris(one_line(exc))
        log.error(
            "%s: %s",
            "invalid input" if code == ExitCode.INVALID else "training failed",
            reason,
            # A full staging cache says all there is to say in its one line; a traceback would bury it.
            exc_info=code != ExitCode.INVALID and not isinstance(exc, NoSpaceError),
        )
        write_termination_log(termination_log, TrainerReport.failure(reason, code).to_json())
        return code
    finally:
        tracking.close()  # after a failure: the MLflow run ends FAILED, the event files are uploaded
        if server is not None:
            server.close()
        close_distributed()


if __name__ == "__main__":
    sys.exit(main())
