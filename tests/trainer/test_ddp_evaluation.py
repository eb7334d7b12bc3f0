"""Under DDP every rank must evaluate the very weights rank 0 checkpoints, BatchNorm statistics included."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from trainer_testkit import make_job, metrics_records, run_trainer, trainer_env, write_spec

pytestmark = pytest.mark.slow


@pytest.mark.timeout(120)
def test_best_checkpoint_reproduces_its_validation_metrics(tmp_path: Path, tiny_data: Path) -> None:
    # Each rank's forward updates its BatchNorm running stats from its own batch; rank 0's are what gets
    # saved. Re-evaluating the best checkpoint must give the numbers recorded when it was validated.
    job = make_job(tmp_path, tiny_data, epochs=2, resources={"procsPerNode": 2}, data={"batchSize": 4})
    result = run_trainer(write_spec(job, tmp_path / "spec.json"), trainer_env(tmp_path), procs=2)
    assert result.returncode == 0, result.stdout + result.stderr
    run = Path(job.run_uri)
    best = json.loads((Path(job.spec.checkpoint.uri or "") / "best.json").read_text())
    validated = next(r for r in metrics_records(run) if r["epoch"] == best["epoch"])
    evaluation = json.loads((run / "summary.json").read_text())["evaluation"]
    assert evaluation["split"] == "val"
    for name in ("loss", "accuracy", "f1"):
        assert math.isclose(evaluation["metrics"][name], validated[f"val/{name}"], rel_tol=1e-5), name
