"""Experiment tracking on real parts: a run on S3 (moto over HTTP) that logs to a real MLflow tracking server on
loopback, is resumed for one more epoch, and is read back with TensorBoard's own reader and MLflow's client.

One two-phase run (2 epochs, then the same job raised to 3 epochs, which resumes from the checkpoint) feeds every
test here: starting an MLflow server dominates the time, so it is started once.
"""

from __future__ import annotations

import io
import json
import logging
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from inprocess import CPU, run_main
from PIL import Image
from tracking_server import mlflow_server
from trainer_testkit import make_job, trainer_env

from kiln.api.resolve import ResolvedTrainingJob
from kiln.storage import Store, open_store
from kiln.testing.processes import free_port
from kiln.testing.s3 import S3Server
from kiln.trainer import pictures, tracking
from kiln.trainer.tensorboard_log import TENSORBOARD
from kiln.trainer.trainer import Trainer

pytestmark = pytest.mark.slow
UID = "0b5c1e2a-7d3f-4e61-9a0c-5f8e2d1b4c77"


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``mlflow server`` on 127.0.0.1 with a SQLite store and artifacts under a temporary folder."""
    with mlflow_server(tmp_path_factory.mktemp("mlflow")) as uri:
        yield uri


@dataclass
class Run:
    first: ResolvedTrainingJob
    resumed: ResolvedTrainingJob
    store: Store
    local: Path  # the run's outputs, copied from S3
    confusion_calls: list[tuple[np.ndarray, list[str]]]
    log_lines: list[str]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path, s3_server: S3Server, mlflow_uri: str) -> Run:
    """2 epochs in a Trainer, then ``python -m kiln.trainer``'s main() in this process with epochs raised to 3."""
    tmp = tmp_path_factory.mktemp("tracking")
    bucket = s3_server.create_bucket(hint="tracking")
    overrides: dict[str, Any] = {
        "output": {"uri": f"s3://{bucket}/runs/tiny"},
        "storage": {"endpointUrl": s3_server.endpoint_url},
        "tracking": {"mlflow": {"uri": mlflow_uri, "experiment": "kiln-tests", "runName": "tiny-tracking"}},
    }
    first = make_job(tmp, tiny_data, epochs=2, **overrides).model_copy(update={"uid": UID})
    resumed = make_job(tmp, tiny_data, epochs=3, **overrides).model_copy(update={"uid": UID})
    calls: list[tuple[np.ndarray, list[str]]] = []
    lines: list[str] = []

    def recording_confusion(normalized: np.ndarray, names: list[str], title: str) -> bytes:
        calls.append((normalized, list(names)))
        return original_confusion(normalized, names, title)

    class Lines(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    original_confusion = tracking.confusion_png
    handler, logger = Lines(logging.INFO), logging.getLogger("kiln.trainer")
    signals = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}  # main() installs its own
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tracking, "confusion_png", recording_confusion)
        for key, value in trainer_env(tmp).items():
            patch.setenv(key, value)
        assert Trainer(first, CPU).train() == "completed"
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        try:
            code, message = run_main(tmp, resumed)
        finally:
            logger.removeHandler(handler)
            logger.setLevel(logging.NOTSET)
            for sig, previous in signals.items():
                signal.signal(sig, previous)
    assert code == 0 and message["state"] == "completed", message
    store = open_store(resumed.run_uri, resumed.spec.storage)
    local = tmp / "outputs"
    for item in store.list():
        store.download_file(item.key, local / item.key)
    return Run(first, resumed, store, local, calls, lines)


def records(run: Run) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run.local / "metrics.jsonl").read_text().splitlines()]


# -- TensorBoard ----------------------------------------------------------------------------------------------


def test_tensorboard_scalars_match_metrics_jsonl_and_the_resume_appends_to_the_run(run: Run) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    folder = run.local / TENSORBOARD
    assert len(list(folder.glob("events.out.tfevents.*"))) == 2  # one per process, in the same run folder
    board = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    board.Reload()
    history = records(run)
    assert [r["epoch"] for r in history] == [1, 2, 3]
    for record in history:
        for tag in ("train/loss", "train/lr", "train/images_per_sec", "val/accuracy", "val/loss", "val/f1", "epoch"):
            events = [e for e in board.Scalars(tag) if e.step == record["step"]]
            assert len(events) == 1, (tag, record["step"])  # every step once, the resumed one too
            assert events[0].value == pytest.approx(record[tag], rel=1e-6), tag
    steps = [e.step for e in board.Scalars("train/loss")]
    assert steps == sorted(set(steps)) and steps[-1] == history[-1]["step"]
    assert {"best/val/accuracy", "best/val/loss"} <= set(board.Tags()["scalars"])
    assert {"pictures/curves", "pictures/confusion"} <= set(board.Tags()["images"])
    content = board.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert hparams["optimizer.lr"].number_value == pytest.approx(0.01)
    assert hparams["model.architecture"].string_value == "debug"


# -- pictures -------------------------------------------------------------------------------------------------


def test_curves_and_confusion_are_pngs_next_to_metrics_jsonl(run: Run) -> None:
    for name, low, high in (("curves.png", 5_000, 500_000), ("confusion.png", 3_000, 500_000)):
        data = (run.local / name).read_bytes()
        assert low < len(data) < high, name
        image = Image.open(io.BytesIO(data))
        assert image.format == "PNG" and image.width >= 400 and image.height >= 300, name
    assert records(run)[-1][pictures.RESTARTED_AT] == 2.0  # the resumed process took over after epoch 2
    assert pictures.restarts(records(run)) == [2.0]
    summary = json.loads((run.local / "summary.json").read_text())
    assert summary["pictures"] == {"curves": run.store.url("curves.png"), "confusion": run.store.url("confusion.png")}
    ending = next(line for line in run.log_lines if line.startswith("training completed"))
    assert run.store.url("curves.png") in ending and run.store.url("confusion.png") in ending


def test_the_confusion_picture_is_the_evaluations_matrix_normalized(run: Run) -> None:
    evaluation = json.loads((run.local / "evaluation.json").read_text())["val"]
    counts = np.array(evaluation["confusion"], dtype=float)
    normalized, names = run.confusion_calls[-1]
    np.testing.assert_allclose(normalized, counts / counts.sum(axis=1, keepdims=True))
    assert names == [row["name"] for row in evaluation["classes"]] == ["class0", "class1", "class2"]


def test_normalized_confusion_keeps_empty_rows_at_zero() -> None:
    normalized = pictures.normalized_confusion([[3, 1, 0], [0, 0, 0], [1, 1, 2]])
    np.testing.assert_allclose(normalized, [[0.75, 0.25, 0], [0, 0, 0], [0.25, 0.25, 0.5]])


# -- MLflow ---------------------------------------------------------------------------------------------------


def test_mlflow_run_holds_params_metrics_tags_and_the_best_checkpoint_and_the_resume_continues_it(
    run: Run, mlflow_uri: str, tmp_path: Path
) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_uri)
    experiment = client.get_experiment_by_name("kiln-tests")
    assert experiment is not None
    found = client.search_runs([experiment.experiment_id])
    assert len(found) == 1  # the resumed process continued the run, it did not open a second one
    mlflow_run = found[0]
    run_id = mlflow_run.info.run_id
    assert json.loads(run.store.read_bytes("checkpoints/mlflow-run.json"))["runId"] == run_id
    assert mlflow_run.info.status == "FINISHED" and mlflow_run.info.run_name == "tiny-tracking"
    tags = mlflow_run.data.tags
    assert (tags["kiln.namespace"], tags["kiln.name"], tags["kiln.uid"]) == ("local", "tiny", UID)
    params = mlflow_run.data.params
    assert params["optimizer.lr"] == "0.01" and params["task"] == "classification"
    assert params["epochs"] == "2"  # MLflow keeps a parameter's first value; the resume raised it to 3
    history = records(run)
    accuracy = client.get_metric_history(run_id, "val/accuracy")
    assert [(m.step, m.value) for m in accuracy] == [(r["step"], pytest.approx(r["val/accuracy"])) for r in history]
    losses = {m.step: m.value for m in client.get_metric_history(run_id, "train/loss")}
    assert all(losses[r["step"]] == pytest.approx(r["train/loss"], rel=1e-6) for r in history)
    summary = json.loads((run.local / "summary.json").read_text())
    best = summary["checkpoints"]["best"]
    assert tags["kiln.bestCheckpoint"] == best
    downloaded = Path(client.download_artifacts(run_id, "checkpoints/best/state.pt", str(tmp_path)))
    checkpoints = open_store(run.resumed.checkpoint_uri, run.resumed.spec.storage)
    assert downloaded.read_bytes() == checkpoints.read_bytes(best.removeprefix(f"{run.resumed.checkpoint_uri}/"))
    assert {a.path for a in client.list_artifacts(run_id, "pictures")} == {
        "pictures/curves.png",
        "pictures/confusion.png",
    }


def test_an_unreachable_mlflow_server_is_a_warning_and_training_completes(
    tmp_path: Path, tiny_data: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "kiln")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "not-for-the-log-0123")
    job = make_job(tmp_path, tiny_data, epochs=1, tracking={"mlflow": {"uri": f"http://127.0.0.1:{free_port()}"}})
    with caplog.at_level(logging.WARNING):
        assert Trainer(job, CPU).train() == "completed"
    warnings = [r.getMessage() for r in caplog.records if r.name == "kiln.trainer.tracking"]
    assert any("MLflow: could not start the run" in w and "training goes on" in w for w in warnings), warnings
    assert (Path(job.run_uri) / "curves.png").exists()
    assert "not-for-the-log-0123" not in caplog.text
