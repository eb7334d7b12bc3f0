"""Evaluating any checkpoint: ``kiln evaluate`` and the ``epochs: 0`` TrainingJob it runs, on checkpoints of a tiny
real training run, with the numbers checked against scikit-learn and against the run's own final evaluation."""

from __future__ import annotations

import csv
import json
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image
from sklearn.metrics import accuracy_score, f1_score
from trainer_testkit import assert_per_class_matches_scikit_learn, make_job, trainer_env, write_spec
from typer.testing import CliRunner

from kiln.api.contract import ExitCode
from kiln.cli import app
from kiln.console import LazyConsole
from kiln.local_evaluate import guess_format
from kiln.testing.s3 import S3Server
from kiln.trainer import evaluate
from kiln.trainer.train import main as train_main

CLASSES = ("class0", "class1", "class2")


@dataclass(frozen=True)
class Trained:
    run: Path
    checkpoints: Path
    steps: tuple[str, ...]  # the kept checkpoint folders, oldest first

    @property
    def best(self) -> Path:
        """The state.pt that best.json names: what a checkpoint root stands for."""
        return self.checkpoints / json.loads((self.checkpoints / "best.json").read_text())["name"] / "state.pt"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> Iterator[Trained]:
    """Two epochs of the debug classifier, in this process, keeping a checkpoint per epoch (with EMA weights)."""
    root = tmp_path_factory.mktemp("evaluate")
    job = make_job(root, tiny_data, name="clf", epochs=2, ema={"enabled": True, "decay": 0.5})
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    with pytest.MonkeyPatch.context() as patch:
        for key, value in trainer_env(root).items():
            patch.setenv(key, value)
        assert train_main(["--spec", str(write_spec(job, root / "spec.json"))]) == ExitCode.OK
    for sig, handler in handlers.items():
        signal.signal(sig, handler)
    checkpoints = Path(job.checkpoint_uri)
    steps = tuple(sorted(p.name for p in checkpoints.glob("step-*")))
    assert len(steps) == 2
    yield Trained(Path(job.run_uri), checkpoints, steps)


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    for key, value in trainer_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    yield tmp_path
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


def predictions(path: Path) -> tuple[np.ndarray, np.ndarray]:
    rows = list(csv.DictReader(path.open()))
    return np.array([CLASSES.index(r["label"]) for r in rows]), np.array([CLASSES.index(r["prediction"]) for r in rows])


def termination(output: Path) -> dict[str, Any]:
    """The report an evaluation wrote next to its outputs (its termination message)."""
    return json.loads((output / "termination-log").read_text())  # type: ignore[no-any-return]


def test_evaluating_the_best_checkpoint_reproduces_the_runs_own_evaluation(
    env: Path, trained: Trained, tiny_data: Path
) -> None:
    out = env / "out"
    argv = ["--checkpoint", str(trained.checkpoints), "--data", str(tiny_data / "val"), "--split", "val"]
    assert evaluate.main([*argv, "--output", str(out)]) == ExitCode.OK
    evaluation = json.loads((out / "evaluation.json").read_text())["val"]
    # The run evaluated its best checkpoint (EMA weights) on the same images at its end: the same numbers.
    own = json.loads((trained.run / "evaluation.json").read_text())["val"]
    assert evaluation["checkpoint"] == own["checkpoint"]
    assert evaluation["metrics"] == pytest.approx(own["metrics"], rel=1e-6)
    assert evaluation["confusion"] == own["confusion"]
    y_true, y_pred = predictions(out / "predictions-val.csv")
    assert len(y_true) == 15
    assert evaluation["metrics"]["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred), abs=1e-6)
    assert evaluation["metrics"]["f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro"), abs=1e-6)
    assert_per_class_matches_scikit_learn(evaluation["classes"], y_true, y_pred, 3)
    assert (out / "confusion.png").read_bytes().startswith(b"\x89PNG") and not (out / "curves.png").exists()
    job = json.loads((out / "trainingjob.json").read_text())
    assert job["spec"]["epochs"] == 0 and job["spec"]["checkpoint"]["resume"] == own["checkpoint"]
    report = termination(out)
    assert report["state"] == "completed" and report["progress"]["metrics"]["val/accuracy"] == pytest.approx(
        evaluation["metrics"]["accuracy"], abs=1e-6
    )


@pytest.mark.slow
def test_kiln_evaluate_compares_two_checkpoints_on_s3_data(
    tmp_path: Path, trained: Trained, tiny_data: Path, s3_server: S3Server, s3_bucket: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    for image in sorted((tiny_data / "test").rglob("*.png")):
        key = f"test/{image.relative_to(tiny_data / 'test')}"
        s3_server.client().upload_file(str(image), s3_bucket, key)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("kiln.cli.out", LazyConsole(width=160))  # one line per row, whatever the terminal
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "cache"))
    checkpoints = [str(trained.checkpoints / step) for step in trained.steps]
    argv = ["evaluate", "--data", f"s3://{s3_bucket}/test", "--output", "out", "--endpoint-url", s3_server.endpoint_url]
    result = CliRunner().invoke(app, [*argv, "--checkpoint", checkpoints[0], "--checkpoint", checkpoints[1]])
    assert result.exit_code == ExitCode.OK, result.output
    header = next([c.strip() for c in line.split("┃")[1:-1]] for line in result.output.splitlines() if "┃" in line)
    lines = [line for line in result.output.splitlines() if line.count("│") > 3]
    assert header[0] == "checkpoint"
    assert {"accuracy", "f1", "precision", "recall", "loss"} <= set(header[1:])
    rows = {cells[0]: cells for cells in ([c.strip() for c in line.split("│")[1:-1]] for line in lines)}
    assert set(rows) == {f"checkpoints-{step}" for step in trained.steps}
    assert (tmp_path / "out" / "evaluate.log").exists()
    for label, cells in rows.items():
        folder = tmp_path / "out" / label
        metrics = json.loads((folder / "evaluation.json").read_text())["test"]["metrics"]
        y_true, y_pred = predictions(folder / "predictions-test.csv")
        assert len(y_true) == 12 and metrics["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred), abs=1e-6)
        shown = dict(zip(header, cells, strict=True))
        for name in ("accuracy", "f1", "loss"):
            assert float(shown[name]) == pytest.approx(metrics[name], abs=6e-5), (label, name)
        assert (folder / "confusion.png").exists()


def test_a_missing_checkpoint_is_one_line_and_exit_2(tmp_path: Path, tiny_data: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.chdir(tmp_path)
    missing = tmp_path / "nope" / "state.pt"
    result = CliRunner().invoke(app, ["evaluate", "--checkpoint", str(missing), "--data", str(tiny_data / "test")])
    assert result.exit_code == ExitCode.INVALID
    assert result.output.strip().splitlines() == [f"error --checkpoint: {missing} does not exist"]


def test_a_checkpoint_of_another_task_than_the_data_is_refused(env: Path, trained: Trained) -> None:
    masks = env / "shapes"
    for folder in ("images", "masks"):
        (masks / folder).mkdir(parents=True)
        Image.new("L", (8, 8)).save(masks / folder / "a.png")
    assert guess_format(str(masks)) == "segmentation-folder"  # what kiln evaluate passes as --format
    argv = ["--checkpoint", str(trained.checkpoints), "--data", str(masks), "--format", "segmentation-folder"]
    assert evaluate.main([*argv, "--output", str(env / "out")]) == ExitCode.INVALID
    report = termination(env / "out")
    state = trained.best
    assert report == {"state": "failed", "exitCode": 2, "reason": (
        f"--data: {masks} is segmentation-folder data (segmentation), but {state} is a classification checkpoint "
        "(classification reads imagefolder, csv)"
    )}  # fmt: skip


def test_an_epochs_0_trainingjob_of_another_task_fails_before_reading_data(
    env: Path, trained: Trained, tiny_data: Path
) -> None:
    # The in-cluster form: the trainer checks the checkpoint's task against the job's before anything else.
    seg = {"architecture": "unet", "encoder": "resnet18", "numClasses": 2}
    folder = {"uri": str(env / "no-such-data"), "format": "segmentation-folder"}
    job = make_job(env, tiny_data, name="seg", task="segmentation", model=seg, epochs=0,
                   data={"train": folder, "val": folder}, checkpoint={"resume": str(trained.checkpoints)})  # fmt: skip
    assert train_main(["--spec", str(write_spec(job, env / "spec.json"))]) == ExitCode.INVALID
    state = trained.best
    assert termination(env)["reason"] == (
        f"checkpoint.resume: {state} is a classification checkpoint, but this job's task is segmentation"
    )


def test_kiln_validate_takes_an_epochs_0_job_only_with_a_checkpoint_and_data_to_evaluate(tmp_path: Path) -> None:
    spec = {"task": "classification", "model": {"architecture": "debug"}, "epochs": 0,
            "data": {"train": {"uri": "s3://bucket/train"}, "test": {"uri": "s3://bucket/test"}},
            "checkpoint": {"resume": "s3://bucket/run/checkpoints"}}  # fmt: skip
    document = {"apiVersion": "kiln.dev/v1alpha1", "kind": "TrainingJob", "metadata": {"name": "ev"}, "spec": spec}
    path = tmp_path / "ev.yaml"
    path.write_text(yaml.safe_dump(document))
    assert CliRunner().invoke(app, ["validate", str(path)]).exit_code == ExitCode.OK
    del spec["data"]["test"]
    path.write_text(yaml.safe_dump(document))
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == ExitCode.INVALID
    assert "spec.data: epochs 0 evaluates on data.val or data.test" in result.output
