"""Experiment tracking, on global rank 0: TensorBoard always, MLflow when ``tracking.mlflow`` is set, and the
pictures of ``kiln.trainer.pictures``.

The training loop calls in at a few points (start, every logged step, every epoch, the final evaluation, the
end) and never waits: each call queues work for a worker thread, one for TensorBoard and the pictures, one for
MLflow, so neither a slow upload nor an unreachable tracking server holds up a step, and one cannot hold up the
other. ``finish`` is the one place that waits, for the queues to drain. Tracking is optional: every failure in
it is a warning in the log, never the end of training. The other ranks get the inert base class.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

from kiln.api.resolve import ResolvedTrainingJob
from kiln.storage import Store
from kiln.trainer.checkpoint import STATE, Entry
from kiln.trainer.history import RESTARTED_AT, RunLog
from kiln.trainer.mlflow_log import MlflowLog, clean, now_ms
from kiln.trainer.pictures import CONFUSION, CURVES, confusion_png, curves_png, normalized_confusion
from kiln.trainer.pictures import preload as preload_pictures
from kiln.trainer.tensorboard_log import TENSORBOARD, TensorBoardLog, flat_hparams

log = logging.getLogger(__name__)

SAMPLES = "samples/"  # where task plugins put their sample pictures (segmentation overlays, detection boxes)
MAX_SAMPLE_IMAGES = 16  # into TensorBoard; the store keeps them all
# How long the end of a run waits for each worker's queue: TensorBoard's last upload must land, MLflow may be away.
BOARD_DRAIN_SECONDS, MLFLOW_DRAIN_SECONDS = 300.0, 120.0
NOT_SCALARS = frozenset({"step", "time", RESTARTED_AT})


class Tracking:
    """What every rank but global rank 0 gets: nothing is tracked."""

    def start(self, step: int, epoch: float) -> None:
        """The run (re)starts at optimizer step ``step``, (fractional) epoch ``epoch``."""

    def log_step(self, step: int, values: Mapping[str, float]) -> None:
        """The training scalars of a logged step (loss and its terms, lr, throughput)."""

    def log_epoch(self, record: Mapping[str, Any]) -> None:
        """An epoch's metrics.jsonl record, as it was written."""

    def log_evaluation(self, split: str, step: int, metrics: Mapping[str, float], details: Mapping[str, Any]) -> None:
        """The best checkpoint's final evaluation of ``split`` (its ``details`` may hold a confusion matrix)."""

    def finish(self, state: str, step: int, records: Sequence[Mapping[str, Any]], best: Entry | None) -> dict[str, Any]:
        """The end of this process's training (completed or preempted): the pictures, the last uploads; what
        summary.json gets (the pictures' and the event files' URIs, the MLflow run)."""
        return {}

    def close(self) -> None:
        """Training failed before ``finish``: mark the MLflow run failed and flush what is queued."""

    def where(self) -> str:
        """Where a person finds the pictures and the curves, for the end-of-training line."""
        return ""


class Worker:
    """A daemon thread running queued calls in order. A call that raises is handed to ``failed`` and the queue
    goes on; nothing raised here reaches the training loop."""

    def __init__(self, name: str, failed: Callable[[str, Exception], None]) -> None:
        self.name, self.failed = name, failed
        self._queue: queue.SimpleQueue[tuple[str, Callable[[], None]] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=f"kiln-{name}", daemon=True)

    def submit(self, what: str, call: Callable[[], None]) -> None:
        if self._thread.ident is None:  # started by the first call: a Trainer that never trains leaves no thread
            self._thread.start()
        self._queue.put((what, call))

    def drain(self, timeout: float) -> None:
        if self._thread.ident is None:
            return
        self._queue.put(None)
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("%s: gave up waiting after %.0fs; what was still queued is lost", self.name, timeout)

    def stop(self) -> None:
        """End the thread once what is queued has run, without waiting for it."""
        if self._thread.ident is not None:
            self._queue.put(None)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            what, call = item
            try:
                call()
            except Exception as exc:
                self.failed(what, exc)


class RunTracking(Tracking):
    def __init__(self, job: ResolvedTrainingJob, run_log: RunLog, checkpoints: Store) -> None:
        self.job, self.run_log, self.checkpoints = job, run_log, checkpoints
        self.run_store = run_log.store
        self.tensorboard: TensorBoardLog | None = None
        self.mlflow: MlflowLog | None = None
        self.step_logged: tuple[int, frozenset[str]] = (-1, frozenset())  # the last log_step's step and tags
        self.confusion: tuple[str, list[list[int]], list[str]] | None = None
        self.outputs: dict[str, Any] = {}
        self.finished = False
        self.board = Worker("tensorboard", self._board_failed)
        self.mlflow_worker = Worker("mlflow", self._mlflow_failed) if job.spec.tracking.mlflow is not None else None

    # -- the loop's calls ---------------------------------------------------------------------------------
    def start(self, step: int, epoch: float) -> None:
        if step:
            self.run_log.mark_restart(epoch)
        params = flat_hparams(self.job.spec.model_dump(mode="json", by_alias=True))
        self.board.submit("open the event file", lambda: self._open_board(step + 1, params))
        self._to_mlflow("start the run", lambda: self._open_mlflow(params))

    def log_step(self, step: int, values: Mapping[str, float]) -> None:
        self.step_logged = (step, frozenset(values))
        self._scalars(step, dict(values))

    def log_epoch(self, record: Mapping[str, Any]) -> None:
        step = int(record["step"])
        logged = self.step_logged[1] if self.step_logged[0] == step else frozenset()  # never one tag twice a step
        values = {key: float(value) for key, value in record.items()
                  if key not in NOT_SCALARS and key not in logged and _is_number(value)}  # fmt: skip
        self._scalars(step, values)
        self.board.submit("upload the event files", self._sync_board)

    def log_evaluation(self, split: str, step: int, metrics: Mapping[str, float], details: Mapping[str, Any]) -> None:
        self._scalars(step, {f"best/{split}/{name}": value for name, value in metrics.items()})
        confusion, classes = details.get("confusion"), details.get("classes")
        if confusion and classes and len(confusion) == len(classes):
            self.confusion = (split, confusion, [str(row["name"]) for row in classes])  # the last split's wins

    def finish(self, state: str, step: int, records: Sequence[Mapping[str, Any]], best: Entry | None) -> dict[str, Any]:
        self.finished = True
        rows = [dict(record) for record in records]
        self.board.submit("draw the pictures", lambda: self._pictures(rows, step))
        self.board.submit("add the sample images", lambda: self._samples(step))
        self.board.submit("close the event file", self._close_board)
        if best is not None and state == "completed":
            key = f"{best.name}/{STATE}"
            uri = self.checkpoints.url(key)
            self._to_mlflow("log the best checkpoint", lambda: self._mlflow().best_checkpoint(key, uri))
        self.board.drain(BOARD_DRAIN_SECONDS)
        self._to_mlflow("end the run", lambda: self._mlflow().end(state))
        if self.mlflow_worker is not None:
            self.mlflow_worker.drain(MLFLOW_DRAIN_SECONDS)
        return dict(self.outputs)

    def close(self) -> None:
        if not self.finished:
            self.finished = True
            self.board.submit("close the event file", self._close_board)
            self._to_mlflow("end the run", lambda: self._mlflow().end("failed"))
            self.board.drain(BOARD_DRAIN_SECONDS)
            if self.mlflow_worker is not None:
                self.mlflow_worker.drain(MLFLOW_DRAIN_SECONDS)

    def where(self) -> str:
        parts = [*self.outputs.get("pictures", {}).values()]
        if "tensorboard" in self.outputs:
            parts.append(f"TensorBoard {self.outputs['tensorboard']}")
        if "mlflow" in self.outputs:
            parts.append(f"MLflow {self.outputs['mlflow']['url']}")
        return "; ".join(parts)

    # -- on the workers -----------------------------------------------------------------------------------
    def _scalars(self, step: int, values: dict[str, float]) -> None:
        if not values:
            return
        self.board.submit("write scalars", lambda: self._board().scalars(step, values))
        stamp = now_ms()
        self._to_mlflow("log metrics", lambda: self._mlflow().metrics(step, values, stamp))

    def _open_board(self, first_step: int, params: dict[str, Any]) -> None:
        self.tensorboard = TensorBoardLog(self.run_store, first_step)
        self.tensorboard.hparams(params, [f"val/{self.job.metric.name}"])
        self.outputs["tensorboard"] = self.run_store.url(TENSORBOARD)
        preload_pictures()

    def _board(self) -> TensorBoardLog:
        if self.tensorboard is None:
            raise RuntimeError("no event file (opening it failed)")
        return self.tensorboard

    def _sync_board(self) -> None:
        self._board().sync()

    def _close_board(self) -> None:
        board, self.tensorboard = self.tensorboard, None
        if board is not None:
            board.close()

    def _pictures(self, records: list[dict[str, Any]], step: int) -> None:
        """curves.png (and confusion.png) next to metrics.jsonl, into TensorBoard and MLflow too."""
        title = f"{self.job.namespace}/{self.job.name}"
        # An evaluation (epochs 0) has no epoch to draw: its picture is the confusion matrix alone.
        pictures = {CURVES: curves_png(records, self.job.metric.name, title)} if records else {}
        if self.confusion is not None:
            split, matrix, names = self.confusion
            title = f"{self.job.name}: {split}, best checkpoint (rows sum to 1)"
            pictures[CONFUSION] = confusion_png(normalized_confusion(matrix), names, title)
        for name, png in pictures.items():
            self.run_store.write_bytes(name, png)
            self.outputs.setdefault("pictures", {})[name.removesuffix(".png")] = self.run_store.url(name)
            if self.tensorboard is not None:
                self.tensorboard.image(f"pictures/{name.removesuffix('.png')}", png, step)
            self._to_mlflow(f"upload {name}", partial(self._upload_picture, name, png))

    def _upload_picture(self, name: str, png: bytes) -> None:
        self._mlflow().artifact(name, png, "pictures")

    def _samples(self, step: int) -> None:
        if self.tensorboard is None:
            return
        for item in self.run_store.list(SAMPLES)[:MAX_SAMPLE_IMAGES]:
            if item.key.endswith(".png"):
                self.tensorboard.image(item.key.removesuffix(".png"), self.run_store.read_bytes(item.key), step)

    def _open_mlflow(self, params: dict[str, Any]) -> None:
        spec = self.job.spec.tracking.mlflow
        assert spec is not None
        self.mlflow = MlflowLog(spec, self.job, self.checkpoints)
        self.outputs["mlflow"] = {"runId": self.mlflow.run_id, "url": self.mlflow.url}
        self.mlflow.params(params)

    def _mlflow(self) -> MlflowLog:
        if self.mlflow is None:
            raise RuntimeError("no MLflow run")
        return self.mlflow

    def _to_mlflow(self, what: str, call: Callable[[], None]) -> None:
        if self.mlflow_worker is not None:
            self.mlflow_worker.submit(what, call)

    def _board_failed(self, what: str, error: Exception) -> None:
        log.warning("TensorBoard: could not %s: %s", what, clean(error))

    def _mlflow_failed(self, what: str, error: Exception) -> None:
        """The first failure ends MLflow logging for this process: each later call would wait out the same
        timeouts. A restart tries again."""
        if self.mlflow_worker is None:
            return
        spec = self.job.spec.tracking.mlflow
        log.warning("MLflow: could not %s at %s (%s); MLflow logging is off for the rest of this attempt, "
                    "training goes on", what, spec.uri if spec else "?", clean(error))  # fmt: skip
        worker, self.mlflow_worker = self.mlflow_worker, None
        self.mlflow = None  # what is still queued fails fast, unreported
        worker.stop()


def open_tracking(job: ResolvedTrainingJob, is_main: bool, run_log: RunLog, checkpoints: Store) -> Tracking:
    return RunTracking(job, run_log, checkpoints) if is_main else Tracking()


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
