"""Evaluating a checkpoint without training: ``epochs: 0`` with ``checkpoint.resume: <uri>``.

The run is the trainer's own (the same components, loaders, evaluators and end-of-run evaluation), so
``evaluation.json``, the predictions and the pictures are what a training run writes for its best checkpoint.
Two things come from the checkpoint instead of the training split, which is never read: the weights (the EMA
copy when the run kept one, as the run validated and picked its best checkpoint by, else the model's) and the
class order. A checkpoint of another task, or weights that do not fit ``model``, are invalid input (exit 2).
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kiln.api.contract import ExitCode
from kiln.api.resolve import ResolvedTrainingJob
from kiln.api.runtime import StorageSpec
from kiln.trainer.errors import InvalidInput
from kiln.trainer.export.failures import ExportError
from kiln.trainer.export.source import read_checkpoint, strip_wrappers

log = logging.getLogger(__name__)

FIELD = "checkpoint.resume"


@dataclass(frozen=True)
class EvaluatedCheckpoint:
    uri: str
    """The state.pt that was read."""
    weights: dict[str, torch.Tensor]
    from_ema: bool
    class_names: tuple[str, ...]
    """The class order the checkpoint was trained with; empty for checkpoints that predate saving it."""
    task: str
    """The task of the job that wrote the checkpoint."""


def evaluating(job: ResolvedTrainingJob) -> bool:
    return job.spec.epochs == 0


def read_state(uri: str, storage: StorageSpec | None, field: str = FIELD) -> tuple[str, dict[str, Any]]:
    """(the state.pt's URL, its contents) for a state.pt, a checkpoint folder, or a checkpoint root whose
    best.json picks the folder; InvalidInput naming ``field`` when it is missing or not a Kiln checkpoint."""
    try:
        url, data = read_checkpoint(uri, storage, "best")
    except ExportError as exc:
        if exc.exit_code == ExitCode.INVALID:
            raise InvalidInput(f"{field}: {exc}") from exc
        raise
    try:
        # Kiln's own checkpoints hold RNG states next to tensors, so they are full pickles (as on resume).
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    except Exception as exc:  # a truncated or foreign pickle raises nearly anything
        raise InvalidInput(f"{field}: {url} is not a loadable checkpoint: {type(exc).__name__}: {exc}") from exc
    spec = state.get("spec") if isinstance(state, dict) else None
    if not isinstance(spec, dict) or not isinstance(state.get("model"), dict):
        raise InvalidInput(f"{field}: {url} is not a Kiln checkpoint: it holds no model weights and training spec")
    return url, state


def read_evaluated(job: ResolvedTrainingJob) -> EvaluatedCheckpoint:
    """The checkpoint ``checkpoint.resume`` names, checked against this job's task."""
    url, state = read_state(job.spec.checkpoint.resume, job.spec.storage)
    task = str((state["spec"].get("spec") or {}).get("task"))
    if task != job.spec.task:
        raise InvalidInput(f"{FIELD}: {url} is a {task} checkpoint, but this job's task is {job.spec.task}")
    from_ema = isinstance(state.get("ema"), dict)
    return EvaluatedCheckpoint(
        uri=url,
        weights=strip_wrappers(state["ema"] if from_ema else state["model"]),
        from_ema=from_ema,
        class_names=tuple(str(name) for name in state.get("class_names") or ()),
        task=task,
    )


def without_auto_class_weights(job: ResolvedTrainingJob) -> ResolvedTrainingJob:
    """``loss.classWeights: auto`` is counted on the training split, which an evaluation does not read: the
    evaluation loss is then unweighted (the metrics never depend on the loss)."""
    if job.spec.loss.class_weights != "auto":
        return job
    log.info("loss.classWeights auto: the evaluation loss is unweighted (data.train is not read)")
    loss = job.spec.loss.model_copy(update={"class_weights": None})
    return job.model_copy(update={"spec": job.spec.model_copy(update={"loss": loss})})


def load_weights(model: nn.Module, evaluated: EvaluatedCheckpoint, job: ResolvedTrainingJob) -> None:
    try:
        model.load_state_dict(evaluated.weights)
    except RuntimeError as exc:
        gist = str(exc).strip().splitlines()[0:2]
        raise InvalidInput(
            f"{FIELD}: {evaluated.uri}: its weights do not fit model {job.spec.model.architecture}: {' '.join(gist)}"
        ) from exc
    log.info("evaluating %s (%s weights)", evaluated.uri, "ema" if evaluated.from_ema else "model")
