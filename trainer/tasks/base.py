"""The contract between the engine and a task plugin (classification and segmentation now; detection next).

The engine owns the loop, DDP, AMP, checkpoints and observability. A task owns what differs between
problems: how a split's layout is read, which network is built, how a batch becomes a loss, and which
metrics and per-image predictions come out of evaluation. Batches are dicts of tensors with at least
``image`` and ``index``; everything else in them is the task's business.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.data import Dataset

from kiln.api.resolve import ResolvedTrainingJob
from kiln.trainer.errors import InvalidInput
from kiln.trainer.registry import Registry

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


@dataclass(frozen=True)
class TaskData:
    splits: Mapping[str, SplitData]
    num_classes: int
    class_names: tuple[str, ...] = field(default=())


class Objective(Protocol):
    """Batch handling for training: the forward pass (with mixup and the like) and the loss."""

    def forward(self, model: nn.Module, batch: Batch, *, training: bool) -> Any: ...

    def loss(self, outputs: Any, batch: Batch) -> torch.Tensor: ...

    def loss_terms(self) -> Mapping[str, torch.Tensor]:
        """The unweighted terms of the last ``loss`` when it sums several (logged as train/loss/<name>)."""
        ...


class Evaluator(Protocol):
    """Metrics over a whole split, reduced over every rank, plus the rows of the predictions file."""

    @property
    def metric_names(self) -> tuple[str, ...]:
        """The keys ``compute`` returns, known before any data is seen (specs are checked against them)."""
        ...

    def update(self, outputs: Any, batch: Batch, loss: torch.Tensor) -> None: ...

    def compute(self) -> dict[str, float]: ...

    def prediction_rows(self, outputs: Any, batch: Batch, data: SplitData) -> list[dict[str, Any]]: ...


class Task(Protocol):
    def load_data(self, job: ResolvedTrainingJob, roots: Mapping[str, Path]) -> TaskData: ...

    def build_model(self, job: ResolvedTrainingJob, data: TaskData) -> nn.Module: ...

    def build_objective(self, job: ResolvedTrainingJob, data: TaskData) -> Objective: ...

    def build_evaluator(self, job: ResolvedTrainingJob, data: TaskData, device: torch.device) -> Evaluator: ...


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
    ``terms`` keeps each one's unweighted value from the last call (detached), for logging."""

    def __init__(self, registry: Registry[LossInfo], job: ResolvedTrainingJob, data: TaskData) -> None:
        self._terms = [(name, registry.get(name).build(job, data), weight) for name, weight in job.loss_weights.items()]
        self.terms: dict[str, torch.Tensor] = {}

    def __call__(self, outputs: Any, batch: Batch) -> torch.Tensor:
        if len(self._terms) == 1:
            _, term, weight = self._terms[0]
            return weight * term(outputs, batch)
        values = {name: term(outputs, batch) for name, term, _ in self._terms}
        self.terms = {name: value.detach() for name, value in values.items()}
        return torch.stack([weight * values[name] for name, _, weight in self._terms]).sum()


def weighted_loss(registry: Registry[LossInfo], job: ResolvedTrainingJob, data: TaskData) -> WeightedLoss:
    return WeightedLoss(registry, job, data)
