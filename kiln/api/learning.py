"""How a model learns and what is kept of it: optimizer, learning-rate schedule, loss, EMA, validation, early
stopping, checkpoints and outputs. Parts of TrainingJob.spec (``kiln.api.training``)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from kiln.api.base import MAX_LIST, KilnModel, Name, Rule, RuleModel, StorageUri

SchedulerName = Literal["cosine", "step", "multistep", "exponential", "plateau", "onecycle", "none"]
MetricMode = Literal["max", "min"]


class OptimizerSpec(KilnModel):
    name: Name = "adamw"
    """sgd, adam, adamw, rmsprop, or any optimizer timm lists (lamb, lion, adan, ...); kiln validate checks the
    name against the generated catalogue."""

    lr: Annotated[float, Field(gt=0, le=10)] = 1e-3
    """Peak learning rate, reached after warmup."""

    weight_decay: Annotated[float, Field(ge=0, le=10)] = 0.05
    """Weight decay; biases and norm weights are exempt. adamw decouples it from the gradient (AdamW); sgd,
    adam and rmsprop add it to the gradient as L2. timm optimizers follow their own definitions: lion and the
    decoupled variants (nadamw, adoptw, lambw, ...) decouple it."""

    momentum: Annotated[float, Field(ge=0, lt=1)] | None = None
    """Momentum, for the optimizers that take one (sgd, rmsprop, and timm's lars, madgrad, ...). Omitted: each
    optimizer keeps its own (sgd 0.9 with Nesterov, rmsprop 0)."""

    betas: Annotated[list[Annotated[float, Field(ge=0, lt=1)]], Field(min_length=2, max_length=2)] | None = None
    """[beta1, beta2] for every optimizer that takes betas (adam, adamw, lamb, lion, ...). Omitted: each
    optimizer keeps its own (adam/adamw [0.9, 0.999], lion [0.9, 0.99]). Three-beta optimizers (adan) keep
    their own third."""


class SchedulerSpec(KilnModel):
    name: SchedulerName = "cosine"
    """The learning-rate schedule after warmup."""

    warmup_epochs: Annotated[float, Field(ge=0, le=1000)] = 0.0
    """Linear warmup from warmupLr to optimizer.lr, in (fractional) epochs."""

    warmup_lr: Annotated[float, Field(ge=0)] = 1e-6
    """Learning rate at the start of warmup."""

    min_lr: Annotated[float, Field(ge=0)] = 0.0
    """Floor of the cosine schedule."""

    step_epochs: Annotated[int, Field(ge=1, le=100000)] = 30
    """step: decay every this many epochs."""

    milestones: Annotated[list[Annotated[int, Field(ge=1)]], Field(max_length=MAX_LIST)] = Field(
        default_factory=lambda: [30, 60, 90]
    )
    """multistep: the epochs at which the learning rate decays."""

    gamma: Annotated[float, Field(gt=0, le=1)] = 0.1
    """Decay factor for step, multistep and exponential (per epoch) and plateau."""

    patience: Annotated[int, Field(ge=0, le=10000)] = 5
    """plateau: validations without improvement before the learning rate decays."""


class LossSpec(RuleModel):
    name: Name | None = None
    """A single loss by name. Classification: cross_entropy (the default). Segmentation (smp's losses): dice,
    jaccard, focal, lovasz, tversky, cross_entropy (binary cross-entropy when numClasses is 1) and bce
    (numClasses 1 only); the default is {dice: 0.5, cross_entropy: 0.5}. Detection (the model's own losses) is
    not implemented yet."""

    weights: Annotated[dict[str, Annotated[float, Field(ge=0)]], Field(max_length=8)] | None = None
    """A weighted sum of named losses, for example {dice: 0.5, cross_entropy: 0.5}; each term is also logged
    on its own (train/loss/dice). Exclusive with name."""

    class_weights: Annotated[list[Annotated[float, Field(ge=0)]], Field(max_length=100000)] | None = None
    """Per-class weights, one per class, for imbalanced data. Segmentation: multi-class only, applied by
    cross_entropy, dice, jaccard, focal and tversky (lovasz takes none)."""

    __rules__ = (
        Rule(
            cel="!(has(self.name) && has(self.weights))",
            message="name and weights are exclusive: name one loss or weigh several",
            holds=lambda loss: not (loss.name is not None and loss.weights is not None),
            field="weights",
        ),
    )


class EmaSpec(KilnModel):
    enabled: bool = False
    """Keep an exponential moving average of the weights, validated and exported in place of the raw ones."""

    decay: Annotated[float, Field(gt=0, lt=1)] = 0.9998
    """EMA decay per optimizer step."""


class ValidationSpec(KilnModel):
    every: Annotated[int, Field(ge=1, le=10000)] = 1
    """Validate every this many epochs (and always after the last one)."""

    metric: Name | None = None
    """The metric that picks the best checkpoint: accuracy, f1, loss, miou, map, ... Defaults per task."""

    mode: MetricMode | None = None
    """Whether a larger (max) or smaller (min) metric is better. Defaults from the metric."""


class EarlyStoppingSpec(KilnModel):
    patience: Annotated[int, Field(ge=1, le=10000)] = 10
    """Validations without improvement before training stops."""

    min_delta: Annotated[float, Field(ge=0)] = 0.0
    """The smallest change that counts as an improvement."""

    metric: Name | None = None
    """The watched metric; defaults to validation.metric."""

    mode: MetricMode | None = None
    """max or min; defaults to validation.mode."""


class CheckpointSpec(RuleModel):
    uri: StorageUri | None = None
    """Where checkpoints go: s3://bucket/prefix or a local directory. Defaults to <output.uri>/checkpoints."""

    every_epochs: Annotated[int, Field(ge=0, le=10000)] = 1
    """Save every this many epochs; 0 turns epoch checkpoints off."""

    every_steps: Annotated[int, Field(ge=0)] = 0
    """Also save every this many optimizer steps; 0 turns step checkpoints off."""

    keep_last: Annotated[int, Field(ge=1, le=1000)] = 2
    """How many of the most recent checkpoints to keep."""

    keep_best: Annotated[int, Field(ge=0, le=1000)] = 1
    """How many of the best-scoring checkpoints to keep besides them."""

    resume: StorageUri = "auto"
    """auto: continue from this job's latest checkpoint if there is one. never: always start over.
    Anything else is the URI of a checkpoint to start from."""


class OutputSpec(KilnModel):
    uri: StorageUri | None = None
    """Where metrics.jsonl, summary.json and predictions go. Defaults to ./.kiln/<job> locally, or to the
    operator's configured root in a cluster."""
