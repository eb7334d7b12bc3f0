"""The training loop. ``Trainer.train()`` is its outline; every verb in it belongs to a component."""

from __future__ import annotations

import logging
import random
import time
from typing import Any

import numpy as np
import torch

from kiln.api.base import MAX_LIST, MAX_MAP
from kiln.api.contract import Annotation, TrainerReport, TrainerState
from kiln.api.resolve import ResolvedTrainingJob
from kiln.api.status import CheckpointStatus, KeptCheckpoint, Progress
from kiln.trainer.components import Components, build_components
from kiln.trainer.control import ControlState, Signals
from kiln.trainer.distributed import World, broadcast_buffers, broadcast_object, gather_objects, unwrap
from kiln.trainer.observability import TrainerMetrics
from kiln.trainer.preemption import PreemptionFlag
from kiln.trainer.progress import EtaClock, NullReporter, ProgressReporter, now_rfc3339
from kiln.trainer.tasks.base import Evaluator, OwnPredictions, SplitAware
from kiln.trainer.tracking import open_tracking

log = logging.getLogger(__name__)

LOG_EVERY_STEPS = 10
CHECKPOINT_FORMAT = 1


class Trainer:
    def __init__(
        self,
        job: ResolvedTrainingJob,
        world: World,
        *,
        preemption: PreemptionFlag | None = None,
        reporter: ProgressReporter | None = None,
        metrics: TrainerMetrics | None = None,
        control: ControlState | None = None,
    ) -> None:
        self.job, self.spec, self.world = job, job.spec, world
        self.preemption = preemption or PreemptionFlag()
        self.control = control or ControlState()  # rank 0's receives the operator's requests (POST /control)
        self.reporter: ProgressReporter = reporter or NullReporter()
        self.metrics = metrics or TrainerMetrics()
        self.c: Components = build_components(job, world)
        self.tracking = open_tracking(job, world.is_main, self.c.run_log, self.c.checkpointer.store)  # rank 0's
        self.epoch = 0  # the epoch in progress (0-based); equals spec.epochs when done
        self.batch = 0  # micro-batches of that epoch already trained
        self.step = 0  # optimizer steps, across restarts
        self.latest_metrics: dict[str, float] = {}
        self.state: TrainerState = "running"
        self.stop_reason: str | None = None  # set when early stopping ends the run before spec.epochs
        self.eta = EtaClock(0)
        self.final: dict[str, Any] = {}  # test metrics and the predictions URI, for summary.json

    # -- the outline --------------------------------------------------------------------------------------
    def train(self) -> TrainerState:
        self.resume()
        self.c.run_log.load()
        self.eta = EtaClock(self.step)
        batches = len(self.c.train_loader) if self.c.train_loader is not None else 0  # None: epochs 0 evaluates
        self.tracking.start(self.step, self.epoch + self.batch / batches if batches else float(self.epoch))
        while self.should_continue():
            if not self.train_epoch():  # SIGTERM, or a stop request, mid-epoch
                self.save_checkpoint(score=None)
                if self.control.last.preempt:
                    self.finish("preempted")
                    return self.state
                break
            self.epoch, self.batch = self.epoch + 1, 0
            score = self.validate_if_due()
            self.record_epoch()
            signals = self.sync_signals()
            if signals.save or self.c.checkpointer.due_at_epoch(self.epoch, last=not self.should_continue()):
                self.save_checkpoint(score=score)
            if signals.preempt:
                self.finish("preempted")
                return self.state
        self.evaluate_best()
        self.finish("completed")
        return self.state

    def should_continue(self) -> bool:
        return self.epoch < self.spec.epochs and self.stop_reason is None

    # -- training -----------------------------------------------------------------------------------------
    def train_epoch(self) -> bool:
        """One pass over the training split from ``self.batch`` on; False when preempted or stopped mid-epoch."""
        c = self.c
        assert c.train_loader is not None and c.train_sampler is not None, "only an evaluation (epochs 0) has none"
        c.model.train()
        if c.freezer.set_epoch(self.epoch):  # DDP only syncs the parameters that trained when it was built
            c.model = c.accelerator.rewrap(c.model)
        c.train_sampler.set_epoch(self.epoch, skip_samples=self.batch * self.spec.data.batch_size)
        c.objective.set_epoch(self.epoch)
        weights = c.objective.loss_weights()  # loss.schedule's, once per epoch: they hold for all of it
        self.latest_metrics.update({f"train/loss_weight/{name}": weight for name, weight in weights.items()})
        remaining = len(c.train_loader)
        loss_sum, loss_count = torch.zeros((), device=self.world.device), 0
        term_sums: dict[str, torch.Tensor] = {}  # the terms of a combined loss, for train/loss/<name>
        tick = time.perf_counter()
        for index, batch in enumerate(c.train_loader):
            data_wait = time.perf_counter() - tick
            loss = self.train_step(batch, last=index == remaining - 1)
            loss_sum += loss.detach()
            loss_count += 1
            for name, value in c.objective.loss_terms().items():
                term_sums[name] = term_sums[name] + value if name in term_sums else value
            self.batch += 1
            if not c.accelerator.stepped:
                tick = time.perf_counter()
                continue
            self.step += 1
            if self.step % LOG_EVERY_STEPS == 0 or index == remaining - 1:
                terms = {name: value / loss_count for name, value in term_sums.items()}
                seconds = time.perf_counter() - tick
                self.observe_step(loss_sum / loss_count, seconds, data_wait, len(batch["image"]), terms)
                loss_sum, loss_count, term_sums = torch.zeros((), device=self.world.device), 0, {}
            signals = self.sync_signals()
            last = index == remaining - 1  # the epoch's end acts on the same signals again (they persist)
            if signals.preempt or (signals.stop and not last):
                return False
            if (signals.checkpoint or c.checkpointer.due_at_step(self.step)) and not last:
                self.save_checkpoint(score=None)
            tick = time.perf_counter()
        return True

    def sync_signals(self) -> Signals:
        """The step boundary's one collective: SIGTERM on any rank, rank 0's stop and checkpoint requests."""
        signals = self.control.sync(self.preemption.requested, self.world.device)
        if signals.stop and self.stop_reason is None:
            self.stop_reason = f"stopped on request ({Annotation.STOP}) at epoch {self.epoch}, step {self.step}"
            self.control.stopped_at_step = self.step
            log.info("%s", self.stop_reason)
        return signals

    def train_step(self, batch: dict[str, Any], *, last: bool) -> torch.Tensor:
        c = self.c
        batch = self.to_device(batch)
        with c.accelerator.accumulate(c.model, last=last), c.accelerator.autocast():
            outputs = c.objective.forward(c.model, batch, training=True)
            loss = c.objective.loss(outputs, batch)
        c.accelerator.backward(loss, last=last)
        if c.accelerator.step(c.model, c.optimizer, last=last):
            c.schedule.step()
            if c.ema is not None:
                c.ema.update(unwrap(c.model), step=self.step)
        return loss

    def to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {k: self.c.accelerator.to_device(v) for k, v in batch.items()}

    def observe_step(
        self, loss: torch.Tensor, seconds: float, data_wait: float, batch_size: int, terms: dict[str, torch.Tensor]
    ) -> None:
        images_per_second = batch_size * self.world.world_size / max(seconds, 1e-9)
        value = float(loss.item())
        scalars = {"train/loss": value, "train/lr": self.c.schedule.last_lr, "train/images_per_sec": images_per_second}
        scalars.update({f"train/loss/{name}": float(term.item()) for name, term in terms.items()})
        self.latest_metrics.update(scalars)
        self.tracking.log_step(self.step, scalars)
        self.metrics.observe_step(
            loss=value,
            lr=self.c.schedule.last_lr,
            step=self.step,
            seconds=seconds,
            data_wait=data_wait,
            samples_per_second=batch_size / max(seconds, 1e-9),  # this rank's own: a straggler shows
            terms={name: self.latest_metrics[f"train/loss/{name}"] for name in terms},
            progress=min(1.0, self.step / max(self.c.horizon.total_steps, 1)),
        )
        self.metrics.observe_memory(self.world.device)
        self.report()

    # -- evaluation ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(
        self, split: str, *, predictions: bool = False
    ) -> tuple[dict[str, float], list[dict[str, Any]], dict[str, Any], Evaluator]:
        """The split's metrics on every rank; with ``predictions``, also every rank's prediction rows (on rank 0)
        and the evaluator's details (per-class numbers, confusion matrix) for evaluation.json; and the evaluator,
        which may write its own predictions file (``OwnPredictions``)."""
        c = self.c
        model = c.ema.module if c.ema is not None else unwrap(c.model)
        broadcast_buffers(model)  # every rank evaluates exactly the weights rank 0 checkpoints
        model.eval()
        evaluator = c.evaluator(self.job, self.world)
        if isinstance(evaluator, SplitAware):
            evaluator.begin(split, c.data.splits[split])
        rows: list[dict[str, Any]] = []
        for raw in c.eval_loaders[split]:
            batch = self.to_device(raw)
            with c.accelerator.autocast():
                outputs = c.objective.forward(model, batch, training=False)
                loss = c.objective.loss(outputs, batch)
            evaluator.update(outputs, batch, loss)
            if predictions:
                rows.extend(evaluator.prediction_rows(outputs, batch, c.data.splits[split]))
        c.model.train()
        all_rows = [row for part in gather_objects(rows) for row in part] if predictions else []
        return evaluator.compute(), all_rows, evaluator.details() if predictions else {}, evaluator

    def validate_if_due(self) -> float | None:
        last = self.epoch == self.spec.epochs
        if "val" not in self.c.eval_loaders or not (self.epoch % self.spec.validation.every == 0 or last):
            return None
        metrics, _, _, _ = self.evaluate("val")
        self.latest_metrics.update({f"val/{k}": v for k, v in metrics.items()})
        self.metrics.observe_validation(metrics)
        score = metrics[self.job.metric.name]
        self.c.schedule.observe(score)
        stopping, watched_metric = self.spec.early_stopping, self.job.early_stopping_metric
        if self.c.early_stopping is not None and stopping is not None and watched_metric is not None:
            watched = watched_metric.name
            if self.c.early_stopping.observe(metrics[watched]):
                self.stop_reason = (
                    f"early stopping: {watched} did not improve by more than {stopping.min_delta:g} for "
                    f"{stopping.patience} validation(s); best {self.c.early_stopping.best:.4f}, stopped at epoch "
                    f"{self.epoch} of {self.spec.epochs}"
                )
                log.info("%s", self.stop_reason)
        log.info("epoch %d validation: %s", self.epoch, _fmt(metrics))
        return score

    def evaluate_best(self) -> None:
        """Evaluate val, then test, with the best checkpoint's weights (the last ones without checkpoints); write
        each split's evaluation.json entry and per-image predictions. summary.json gets test (else val)."""
        splits = [split for split in ("val", "test") if split in self.c.eval_loaders]
        if not splits:
            return
        best = broadcast_object(self.c.checkpointer.best)  # only rank 0 tracks saves and retention
        if best is not None:
            state = self.c.checkpointer.load_entry(best)
            unwrap(self.c.model).load_state_dict(state["model"])
            if self.c.ema is not None and state.get("ema") is not None:
                self.c.ema.module.load_state_dict(state["ema"])
        checkpoint = self.c.checkpointer.uri(best) or self.c.evaluated
        for split in splits:  # the last split evaluated is the run's result in summary.json
            metrics, rows, details, evaluator = self.evaluate(split, predictions=True)
            self.final = {"evaluation": {"split": split, "checkpoint": checkpoint, "metrics": metrics}}
            if self.c.evaluated is not None:  # an evaluation has no epochs: its results are the status's metrics
                self.latest_metrics.update({f"{split}/{name}": value for name, value in metrics.items()})
            if self.world.is_main:
                self.final["predictions"] = (
                    evaluator.write_predictions(split, rows, self.c.run_log)
                    if isinstance(evaluator, OwnPredictions)
                    else self.c.run_log.write_predictions(f"predictions-{split}.csv", rows)
                )
                evaluation = {"checkpoint": checkpoint, "metrics": metrics, **details}
                self.final["evaluationDetails"] = self.c.run_log.write_evaluation(split, evaluation)
                log.info("%s on the best checkpoint: %s", split, _fmt(metrics))
                self.tracking.log_evaluation(split, self.step, metrics, details)

    # -- state --------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        c = self.c
        rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state(self.world.device)
        return {
            "format": CHECKPOINT_FORMAT,
            "model": unwrap(c.model).state_dict(),
            "optimizer": c.optimizer.state_dict(),
            "schedule": c.schedule.state_dict(),
            "accelerator": c.accelerator.state_dict(),
            "ema": c.ema.module.state_dict() if c.ema is not None else None,
            "early_stopping": c.early_stopping.state_dict() if c.early_stopping is not None else None,
            "stop_reason": self.stop_reason,  # a restart after the decision must not train on
            "stopped_at_step": self.control.stopped_at_step,  # and still ends Stopped
            "epoch": self.epoch,
            "batch": self.batch,
            "step": self.step,
            "rng": gather_objects(rng),
            "metrics": dict(self.latest_metrics),
            "class_names": list(c.data.class_names),  # the exporter's model card: data order is not in the spec
            "spec": self.job.model_dump(mode="json", by_alias=True),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        c = self.c
        unwrap(c.model).load_state_dict(state["model"])
        c.optimizer.load_state_dict(state["optimizer"])
        c.schedule.load_state_dict(state["schedule"])
        c.accelerator.load_state_dict(state["accelerator"])
        if c.ema is not None and state.get("ema") is not None:
            c.ema.module.load_state_dict(state["ema"])
        if c.early_stopping is not None and state.get("early_stopping") is not None:
            c.early_stopping.load_state_dict(state["early_stopping"])
        self.epoch, self.batch, self.step = state["epoch"], state["batch"], state["step"]
        # The epoch of the last trained batch: a restart with no epoch left to train (evaluate_best only) then
        # computes the test loss with the weights an uninterrupted run would have ended on.
        c.objective.set_epoch(self.epoch if self.batch else max(self.epoch - 1, 0))
        self.stop_reason = state.get("stop_reason")
        self.control.stopped_at_step = state.get("stopped_at_step")
        stored_epochs = ((state.get("spec") or {}).get("spec") or {}).get("epochs")
        if self.stop_reason is not None and isinstance(stored_epochs, int) and stored_epochs < self.spec.epochs:
            # spec.epochs was raised after early stopping ended the run: train on, with fresh patience.
            log.info("epochs raised from %d to %d: training on after %s", stored_epochs, self.spec.epochs,
                     self.stop_reason)  # fmt: skip
            self.stop_reason = self.control.stopped_at_step = None
            if c.early_stopping is not None:
                c.early_stopping.stale = 0
        self.latest_metrics = dict(state.get("metrics", {}))
        rng = state.get("rng") or []
        if len(rng) == self.world.world_size:
            own = rng[self.world.rank]
            random.setstate(own["python"])
            np.random.set_state(own["numpy"])
            torch.set_rng_state(own["torch"])
            if "cuda" in own and torch.cuda.is_available():
                torch.cuda.set_rng_state(own["cuda"], self.world.device)

    def resume(self) -> None:
        if self.c.evaluated is not None:  # epochs 0: build_components loaded the evaluated checkpoint's weights
            return
        resume = self.spec.checkpoint.resume
        state = self.c.checkpointer.load_latest() if resume != "never" else None
        if state is None and resume not in ("auto", "never"):
            # A new job started from another job's checkpoint: its weights, none of its progress.
            unwrap(self.c.model).load_state_dict(self.c.checkpointer.load_uri(resume, self.spec.storage)["model"])
            if self.c.ema is not None:  # built before these weights arrived; it would average towards noise
                self.c.ema.set(unwrap(self.c.model))
            log.info("initialized the weights from %s", resume)
            return
        if state is not None:
            self.load_state_dict(state)
            log.info("resumed at epoch %d, batch %d, step %d", self.epoch, self.batch, self.step)

    def save_checkpoint(self, *, score: float | None) -> None:
        requested = self.control.pending_checkpoint()  # a save that starts after a request answers it
        state = self.state_dict()  # every rank: the RNG states are gathered
        uri = self.c.checkpointer.save(state, epoch=self.epoch, step=self.step, score=score)
        if uri is not None:
            self.control.acknowledge(requested, uri, self.step)
            latest = self.c.checkpointer.latest
            self.metrics.observe_checkpoint(
                seconds=self.c.checkpointer.save_seconds, size_bytes=latest.size if latest is not None else None
            )
        self.report()

    # -- reporting ----------------------------------------------------------------------------------------
    def snapshot(self) -> TrainerReport:
        total = self.c.horizon.total_steps
        metric = self.job.metric.name
        value = self.latest_metrics.get(f"val/{metric}")
        checkpointer = self.c.checkpointer
        best = checkpointer.best
        kept = [KeptCheckpoint(uri=checkpointer.uri(e) or "", epoch=e.epoch, step=e.step, metric=e.score)
                for e in sorted(checkpointer.entries, key=lambda e: e.step)][-MAX_LIST:]  # fmt: skip
        return TrainerReport(
            state=self.state,
            progress=Progress(
                epoch=self.epoch,
                total_epochs=self.spec.epochs,
                step=self.step,
                percent=round(min(100.0, 100.0 * self.step / max(total, 1)), 2),
                eta_seconds=0.0 if self.state == "completed" else self.eta.eta_seconds(self.step, total),
                metrics={k: round(v, 6) for k, v in status_metrics(self.latest_metrics, f"val/{metric}").items()},
                metric=f"{metric}={value:.4f}" if value is not None else None,
                updated_at=now_rfc3339(),
            ),
            checkpoints=CheckpointStatus(
                latest=self.c.checkpointer.uri(self.c.checkpointer.latest),
                best=self.c.checkpointer.uri(best),
                best_metric=best.score if best is not None else None,
                kept=kept or None,
            ),
            stop_reason=self.stop_reason,
            control=self.control.status(),
        )

    def report(self) -> None:
        if self.world.is_main:
            self.reporter.report(self.snapshot())

    def record_epoch(self) -> None:
        self.metrics.epoch.set(self.epoch)
        self.metrics.observe_memory(self.world.device)
        if self.world.is_main:
            record = {"epoch": self.epoch, "step": self.step, "time": now_rfc3339(), **self.latest_metrics}
            self.c.run_log.append(record)
            self.tracking.log_epoch(record)
            self.write_summary()
        self.report()

    def write_summary(self) -> None:
        if self.world.is_main:
            summary = {"job": f"{self.job.namespace}/{self.job.name}", **self.snapshot().to_dict(), **self.final}
            self.c.run_log.write_summary(summary)

    def finish(self, state: TrainerState) -> None:
        self.state = state
        self.final.update(self.tracking.finish(state, self.step, self.c.run_log.records, self.c.checkpointer.best))
        self.write_summary()
        self.report()


def status_metrics(metrics: dict[str, float], watched: str) -> dict[str, float]:
    """At most MAX_MAP metrics for /progress and the status (per-class ones can be many, metrics.jsonl keeps
    them all): the watched metric, then top-level names (val/miou) before nested ones (val/iou/7)."""
    if len(metrics) <= MAX_MAP:
        return metrics
    order = sorted(metrics, key=lambda name: (name != watched, name.count("/") > 1, name))
    return {name: metrics[name] for name in order[:MAX_MAP]}


def _fmt(metrics: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4f}" for k, v in metrics.items())
