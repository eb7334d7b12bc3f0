"""Entry point: ``torchrun ... -m kiln.trainer --spec /etc/kiln/trainingjob.json``.

Reads the ResolvedTrainingJob, joins the process group, serves /metrics and /progress on rank 0, trains,
and turns the outcome into an exit code and a termination message (see ``kiln.trainer.errors``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from pydantic import ValidationError

from kiln.api.resolve import ResolvedTrainingJob
from kiln.trainer.distributed import close_distributed, init_distributed
from kiln.trainer.errors import EXIT_FAILED, EXIT_INVALID, EXIT_OK, InvalidInput, one_line
from kiln.trainer.observability import StatusServer, TrainerMetrics
from kiln.trainer.preemption import PreemptionFlag
from kiln.trainer.progress import LatestSnapshot, failure_message, termination_message, write_termination_log

log = logging.getLogger("kiln.trainer")


def load_spec(path: Path) -> ResolvedTrainingJob:
    try:
        return ResolvedTrainingJob.model_validate_json(path.read_bytes())
    except OSError as exc:
        raise InvalidInput(f"--spec {path}: {exc.strerror}") from exc
    except ValidationError as exc:
        raise InvalidInput(f"--spec {path}: not a ResolvedTrainingJob: {exc.errors()[0]['msg']}") from exc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kiln.trainer", description=__doc__)
    parser.add_argument("--spec", type=Path, required=True, help="ResolvedTrainingJob as JSON")
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    # Rank 0 narrates; the other ranks speak up only for warnings and errors.
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
    )
    termination_log = os.environ.get("KILN_TERMINATION_LOG", "/dev/termination-log")
    preemption = PreemptionFlag()
    preemption.install()
    server: StatusServer | None = None
    try:
        from kiln.trainer.trainer import Trainer

        job = load_spec(args.spec)
        world = init_distributed()
        metrics, progress = TrainerMetrics(), LatestSnapshot()
        port = int(os.environ.get("KILN_METRICS_PORT", "9400"))
        if world.is_main and port:
            try:
                server = StatusServer(port, metrics, progress).start()
            except OSError as exc:
                log.warning("cannot serve metrics on port %d: %s", port, exc)
        trainer = Trainer(job, world, preemption=preemption, reporter=progress, metrics=metrics)
        state = trainer.train()
        if world.is_main:
            write_termination_log(termination_log, termination_message(trainer.snapshot()))
        log.info("training %s at epoch %d, step %d", state, trainer.epoch, trainer.step)
        return EXIT_OK
    except Exception as exc:
        code = EXIT_INVALID if isinstance(exc, InvalidInput) else EXIT_FAILED
        reason = one_line(exc)
        log.error(
            "%s: %s",
            "invalid input" if code == EXIT_INVALID else "training failed",
            reason,
            exc_info=code != EXIT_INVALID,
        )
        write_termination_log(termination_log, failure_message(reason, code), first_failure_wins=True)
        return code
    finally:
        if server is not None:
            server.close()
        close_distributed()


if __name__ == "__main__":
    sys.exit(main())
