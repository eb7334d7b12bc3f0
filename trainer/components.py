"""Building the trainer's components from a ResolvedTrainingJob, in dependency order.

data (staged, read; class statistics counted or read back) -> model (class count from data, preprocessing
from the model) -> pipelines and loaders -> accelerator (DDP/AMP) -> optimizer and schedule -> EMA ->
checkpointer, run log, early stopping.
Everything that can reject the input does so here, before the first step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from timm.utils import ModelEmaV3
from torch import nn
from torch.utils.data import DataLoader

from kiln.api.resolve import ResolvedTrainingJob
from kiln.storage import open_store
from kiln.trainer.augment import eval_pipeline, train_pipeline
from kiln.trainer.checkpoint import Checkpointer
from kiln.trainer.class_stats import class_statistics
from kiln.trainer.data import ResumableDistributedSampler, eval_loader, localize, train_loader
from kiln.trainer.distributed import Accelerator, World, pick_precision
from kiln.trainer.errors import InvalidInput
from kiln.trainer.evaluation import evaluating, load_weights, read_evaluated, without_auto_class_weights
from kiln.trainer.export.source import buildable
from kiln.trainer.history import EarlyStopping, RunLog
from kiln.trainer.models import data_config
from kiln.trainer.optim import Horizon, Schedule, create_optimizer
from kiln.trainer.tasks import create_task
from kiln.trainer.tasks.base import Evaluator, Objective, OwnBatching, Task, TaskData
from kiln.trainer.transfer import Freezer


@dataclass
class Components:
    task: Task
    data: TaskData
    model: nn.Module  # prepared: on the device, maybe DDP- and compile-wrapped
    objective: Objective
    accelerator: Accelerator
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    freezer: Freezer  # transfer learning's frozen epochs: the loop calls set_epoch as each epoch starts
    ema: ModelEmaV3 | None
    train_loader: DataLoader[Any] | None  # None when evaluating a checkpoint (epochs 0): data.train is not read
    train_sampler: ResumableDistributedSampler | None
    eval_loaders: dict[str, DataLoader[Any]]
    horizon: Horizon
    checkpointer: Checkpointer
    run_log: RunLog
    early_stopping: EarlyStopping | None
    evaluated: str | None = None  # the checkpoint an evaluation (epochs 0) loaded, for evaluation.json

    def evaluator(self, job: ResolvedTrainingJob, world: World) -> Evaluator:
        return self.task.build_evaluator(job, self.data, world.device)


def _roots(job: ResolvedTrainingJob, world: World) -> dict[str, Path]:
    data = job.spec.data
    sources = {"train": None if evaluating(job) else data.train, "val": data.val, "test": data.test}
    return {split: localize(source, split, job, world) for split, source in sources.items() if source is not None}


def _check_metrics(job: ResolvedTrainingJob, names: tuple[str, ...], *, has_val: bool) -> None:
    """Metric names are only looked up after the first validation; a typo must fail before the first step."""
    watched = {"validation.metric": job.metric}
    if job.early_stopping_metric is not None:
        if not has_val:
            raise InvalidInput("earlyStopping needs validation data: set data.val or data.valSplit")
        watched["earlyStopping.metric"] = job.early_stopping_metric
    for field, metric in watched.items():
        if metric.name not in names:
            raise InvalidInput(f"{field}: unknown metric {metric.name!r}; {job.spec.task} reports {', '.join(names)}")


def build_components(job: ResolvedTrainingJob, world: World) -> Components:
    spec = job.spec
    torch.manual_seed(spec.seed)
    task = create_task(spec.task)
    evaluated = read_evaluated(job) if evaluating(job) else None  # before the data: it fixes the classes
    classes = (evaluated.class_names or None) if evaluated is not None else None
    data = task.load_data(job, _roots(job, world), classes)
    if evaluated is None:
        train, names = data.splits["train"], data.class_names
        count = partial(train.count_classes, names, job, world)
        stats = class_statistics(job, world, classes=names, split_size=len(train), count=count)
        data = replace(data, class_stats=stats)  # before the objective: loss.classWeights auto reads it
    else:
        job = without_auto_class_weights(job)
    model = task.build_model(buildable(job) if evaluated else job, data)
    if evaluated is not None:  # before the EMA copy and DDP: both start from these weights
        load_weights(model, evaluated, job)
    config = data_config(model)
    mean, std = (
        (spec.data.normalize.mean, spec.data.normalize.std) if spec.data.normalize else (config["mean"], config["std"])
    )
    size = spec.data.image_size
    if isinstance(task, OwnBatching):
        train_pipe, eval_pipe = task.pipelines(job, mean, std)
        collate = task.collate
    else:
        train_pipe, eval_pipe = train_pipeline(spec.augmentation, size, mean, std), eval_pipeline(size, mean, std)
        collate = None
    loader, sampler = _train_loader(job, world, data, train_pipe, collate) if evaluated is None else (None, None)
    evals = {
        split: eval_loader(data.splits[split].dataset(eval_pipe), job, world, collate=collate)
        for split in ("val", "test")
        if split in data.splits
    }

    accelerator = Accelerator(
        world,
        pick_precision(spec.precision, world.device),
        grad_accumulation=spec.grad_accumulation,
        grad_clip=spec.grad_clip,
        channels_last=spec.channels_last,
        compile_model=spec.compile,
        find_unused_parameters=spec.resources.find_unused_parameters,
    )
    ema = ModelEmaV3(model, decay=spec.ema.decay, device=world.device) if spec.ema.enabled else None
    prepared = accelerator.prepare(model)
    transfer = task.transfer(job, model)
    part = transfer.parameter_names(model) if transfer is not None else frozenset()  # refuses a missing part
    lr_scale = transfer.lr_scale if transfer is not None else None
    # Built once, before any freeze, over every parameter: its groups stay valid across the unfreeze and resume.
    optimizer = create_optimizer(spec.optimizer, model, part if lr_scale is not None else (), lr_scale or 1.0)
    # An evaluation trains no step; 1 keeps the per-epoch schedules (step, exponential) from dividing by zero.
    steps_per_epoch = math.ceil(len(loader) / spec.grad_accumulation) if loader is not None else 1
    horizon = Horizon(
        total_steps=steps_per_epoch * spec.epochs,
        steps_per_epoch=steps_per_epoch,
        warmup_steps=round(spec.scheduler.warmup_epochs * steps_per_epoch),
    )
    mode = job.metric.mode
    schedule = Schedule(spec.scheduler, optimizer, horizon, spec.optimizer.lr, mode)
    checkpointer = Checkpointer(spec.checkpoint, open_store(job.checkpoint_uri, spec.storage), mode=mode)
    stopping, watched = spec.early_stopping, job.early_stopping_metric
    early = (
        EarlyStopping(stopping.patience, stopping.min_delta, watched.mode)
        if stopping is not None and watched is not None
        else None
    )
    _check_metrics(job, task.build_evaluator(job, data, world.device).metric_names, has_val="val" in evals)
    return Components(
        task=task,
        data=data,
        model=prepared,
        objective=task.build_objective(job, data),
        accelerator=accelerator,
        optimizer=optimizer,
        schedule=schedule,
        freezer=Freezer(model, transfer),
        ema=ema,
        train_loader=loader,
        train_sampler=sampler,
        eval_loaders=evals,
        horizon=horizon,
        checkpointer=checkpointer,
        run_log=RunLog(open_store(job.run_uri, spec.storage)),
        early_stopping=early,
        evaluated=evaluated.uri if evaluated is not None else None,
    )


def _train_loader(
    job: ResolvedTrainingJob, world: World, data: TaskData, pipeline: Any, collate: Any
) -> tuple[DataLoader[Any], ResumableDistributedSampler]:
    spec = job.spec
    train_set = data.splits["train"].dataset(pipeline)
    mixing = spec.augmentation.mixup > 0 or spec.augmentation.cutmix > 0
    loader, sampler = train_loader(train_set, job, world, drop_last=mixing, collate=collate)
    if len(loader) == 0:
        train_images = len(data.splits["train"])
        raise InvalidInput(f"data.train: {train_images} images leave no batch for {world.world_size} processes")
    return loader, sampler
