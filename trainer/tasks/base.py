"""The contract between the engine and a task plugin (classification, segmentation and detection).

The engine owns the loop, DDP, AMP, checkpoints and observability. A task owns what differs between
problems: how a split's layout is read, which network is built, how a batch becomes a loss, and which
metrics and per-image predictions come out of evaluation. Batches are dicts with at least ``image`` and
``index``; ``image`` is a tensor or a list of per-image tensors (detection's images keep their own boxes),
and ``len(batch["image"])`` is the batch size. Everything else in them is the task's business.

Beyond ``Task``, ``Objective`` and ``Evaluator``, a plugin may implement capabilities the engine asks for
with ``isinstance`` (each a small runtime-checkable protocol): ``OwnBatching`` (its pipelines and collate),
``SplitAware`` (its evaluator reads the evaluated split's files) and ``OwnPredictions`` (its predictions file).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn
from torch.utils.data import Dataset

from kiln.api.resolve import ResolvedTrainingJob
from kiln.trainer.class_stats import ClassStats
from kiln.trainer.distributed import World
from kiln.trainer.errors import InvalidInput
from kiln.trainer.history import RunLog
from kiln.trainer.registry import Registry
from kiln.trainer.transfer import Transfer

Batch = dict[str, Any]
Pipeline = Callable[..., dict[str, Any]]  # an albumentations Compose: pipeline(image=..., [mask=...]) -> dict
SPLITS = ("train", "val", "test")


class SplitData(Protocol):
    """One split, read but not yet decoded: it becomes a Dataset once the preprocessing pipeline is known."""

    @property
    def root(self) -> Path:
        """The split's directory (staged or local)."""
        ...

    def __len__(self) -> int: ...

    def dataset(self, pipeline: Pipeline) -> Dataset[Batch]: ...

    def describe(self, index: int) -> str:
        """How the item at ``index`` is named in the predictions file (its path relative to the split root)."""
        ...

    def count_classes(self, class_names: tuple[str, ...], job: ResolvedTrainingJob, world: World) -> ClassStats:
        """The split's class statistics, the same on every rank: a split that must read its files to count
        reads a shard per rank and all-reduces the sums."""
        ...


@dataclass(frozen=True)
class TaskData:
    splits: Mapping[str, SplitData]
    num_classes: int
    class_names: tuple[str, ...] = field(default=())
    class_stats: ClassStats | None = None  # the training split's, counted once per run (kiln.trainer.class_stats)


class Objective(Protocol):
    """Batch handling for training: the forward pass (with mixup and the like) and the loss."""

    def forward(self, model: nn.Module, batch: Batch, *, training: bool) -> Any: ...

    def loss(self, outputs: Any, batch: Batch) -> torch.Tensor: ...

    def loss_terms(self) -> Mapping[str, torch.Tensor]:
        """The unweighted terms of the last ``loss`` when it sums several (logged as train/loss/<name>)."""
        ...

    def set_epoch(self, epoch: int) -> None:
        """Called by the engine as each epoch (from 0) starts, and after a resume: what changes per epoch (the
        weights of loss.schedule) follows the epoch alone, so a restarted run picks up where it was."""
        ...

    def loss_weights(self) -> Mapping[str, float]:
        """The weights ``loss`` uses this epoch when loss.schedule moves them (logged as train/loss_weight/<name>
        once per epoch); empty when they are fixed."""
        ...


class Evaluator(Protocol):
    """Metrics over a whole split, reduced over every rank, plus the rows of the predictions file."""

    @property
    def metric_names(self) -> tuple[str, ...]:
        """The keys ``compute`` returns, known before any data is seen (specs are checked against them)."""
        ...

    def update(self, outputs: Any, batch: Batch, loss: torch.Tensor) -> None: ...

    def compute(self) -> dict[str, float]: ...

    def details(self) -> dict[str, Any]:
        """What a person reads in evaluation.json beyond ``compute``'s metrics, JSON-ready and over the whole
        split (reduced like ``compute``): per-class numbers, with class names, and the confusion matrix."""
        ...

    def prediction_rows(self, outputs: Any, batch: Batch, data: SplitData) -> list[dict[str, Any]]: ...


class Task(Protocol):
    def load_data(
        self, job: ResolvedTrainingJob, roots: Mapping[str, Path], classes: tuple[str, ...] | None = None
    ) -> TaskData:
        """The splits ``roots`` names. ``classes``: the class order a checkpoint fixed (an evaluation, epochs 0),
        which then stands in for the training split's, so ``roots`` need not hold train."""
        ...

    def build_model(self, job: ResolvedTrainingJob, data: TaskData) -> nn.Module: ...

    def build_objective(self, job: ResolvedTrainingJob, data: TaskData) -> Objective: ...

    def build_evaluator(self, job: ResolvedTrainingJob, data: TaskData, device: torch.device) -> Evaluator: ...

    def transfer(self, job: ResolvedTrainingJob, model: nn.Module) -> Transfer | None:
        """The pretrained part of ``model`` that the spec freezes or trains at a scaled learning rate (the
        segmentation encoder, a classifier's backbone); None when it asks for neither."""
        ...


@runtime_checkable
class OwnBatching(Protocol):
    """A task whose items the default pipelines and collate cannot handle (detection: boxes move with the image,
    and images of one batch keep their own box counts)."""

    def pipelines(
        self, job: ResolvedTrainingJob, mean: Sequence[float], std: Sequence[float]
    ) -> tuple[Pipeline, Pipeline]:
        """(training pipeline, evaluation pipeline)."""
        ...

    def collate(self, items: list[Batch]) -> Batch: ...


@runtime_checkable
class SplitAware(Protocol):
    """An evaluator that reads the evaluated split itself (detection scores against the split's own boxes in
    original pixels, not the resized ones in the batch)."""

    def begin(self, split: str, data: SplitData) -> None:
        """Called once, before the first ``update`` of an evaluation of ``split``."""
        ...


@runtime_checkable
class OwnPredictions(Protocol):
    """An evaluator whose predictions file is not the default CSV of its rows (detection: a COCO results JSON,
    beside the split's ground truth as COCO JSON, so anyone can recompute mAP with pycocotools)."""

    def write_predictions(self, split: str, rows: list[dict[str, Any]], run_log: RunLog) -> str:
        """Write every rank's rows (on rank 0 only); the URI of the predictions file."""
        ...


@dataclass(frozen=True)
class TaskInfo:
    name: str
    factory: Callable[[], Task]
    description: str


TASKS: Registry[TaskInfo] = Registry("task")


def create_task(name: str) -> Task:
    if name not in TASKS:
        raise InvalidInput(
            f"task {name!r} is not implemented by this trainer yet; available: {', '.join(TASKS.names())}"
        )
    return TASKS.get(name).factory()


@dataclass(frozen=True)
class LossInfo:
    name: str
    build: Callable[[ResolvedTrainingJob, TaskData], Callable[[Any, Batch], torch.Tensor]]
    description: str


class WeightedLoss:
    """``loss_weights`` ({name: weight}) as one callable summing the weighted terms; with more than one term,
    ``terms`` keeps each one's unweighted value from the last call (detached), for logging. ``set_epoch`` moves
    ``weights`` along loss.schedule."""

    def __init__(self, registry: Registry[LossInfo], job: ResolvedTrainingJob, data: TaskData) -> None:
        self._job = job
        self._terms = [(name, registry.get(name).build(job, data)) for name in job.loss_weights]
        self.weights: dict[str, float] = dict(job.loss_weights)
        self.terms: dict[str, torch.Tensor] = {}

    def set_epoch(self, epoch: int) -> None:
        self.weights = self._job.loss_weights_at(epoch)

    def scheduled_weights(self) -> dict[str, float]:
        """``weights`` when loss.schedule moves them, for logging; fixed weights are not worth a metric each."""
        return dict(self.weights) if self._job.spec.loss.schedule else {}

    def __call__(self, outputs: Any, batch: Batch) -> torch.Tensor:
        if len(self._terms) == 1:
            name, term = self._terms[0]
            return self.weights[name] * term(outputs, batch)
        values = {name: term(outputs, batch) for name, term in self._terms}
        self.terms = {name: value.detach() for name, value in values.items()}
        return torch.stack([self.weights[name] * values[name] for name, _ in self._terms]).sum()


def weighted_loss(registry: Registry[LossInfo], job: ResolvedTrainingJob, data: TaskData) -> WeightedLoss:
    return WeightedLoss(registry, job, data)
