"""In-process trainer runs for features that are not distributed: one process, no torchrun, no subprocess."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from trainer_testkit import make_job, write_spec

from kiln.api.resolve import ResolvedTrainingJob
from kiln.trainer.distributed import World
from kiln.trainer.train import main
from kiln.trainer.trainer import Trainer

CPU = World(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def run_main(tmp_path: Path, job: ResolvedTrainingJob) -> tuple[int, dict[str, Any]]:
    """``python -m kiln.trainer`` in this process: the exit code and the termination message."""
    code = main(["--spec", str(write_spec(job, tmp_path / "spec.json"))])
    return code, json.loads((tmp_path / "termination-log").read_text())


def build_trainer(tmp_path: Path, dataset: Path, /, **overrides: Any) -> Trainer:
    """A single-process Trainer with its components built and nothing trained yet."""
    return Trainer(make_job(tmp_path, dataset, **overrides), CPU)


def summary(job: ResolvedTrainingJob) -> dict[str, Any]:
    return json.loads((Path(job.run_uri) / "summary.json").read_text())  # type: ignore[no-any-return]
