"""How a model learns and what is kept of it: optimizer, learning-rate schedule, loss, EMA, validation, early
stopping, checkpoints and outputs. Parts of TrainingJob.spec (``kiln.api.training``)."""

from __future__ import annotations

from itertools import pairwise
from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag

from kiln.api.base import MAX_LIST, KilnModel, Name, Rule, RuleModel, StorageUri

SchedulerName = Literal["cosine", "step", "multistep", "exponential", "plateau", "onecycle", "none"]
MetricMode = Literal["max", "min"]


def _strictly_increasing(values: list[int]) -> bool:
    return all(a < b for a, b in pairwise(values))


def _same_terms(weights: list[dict[str, float]]) -> bool:
    return all(w.keys() == weights[0].keys() for w in weights)


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


class LossKeyframe(KilnModel):
    epoch: Annotated[int, Field(ge=0, le=100000)]
    """The epoch, counted from 0, trained with exactly these weights: 0 is the first epoch, and a keyframe at
    20 holds after 20 epochs (as scheduler.milestones count). Less than epochs."""

    weights: Annotated[dict[str, Annotated[float, Field(ge=0)]], Field(min_length=1, max_length=8)]
    """{name: weight} at that epoch, for example {dice: 0.2, cross_entropy: 0.8}. Every keyframe names the same
    losses; weight 0 switches one off."""


def _class_weights_member(value: Any) -> str | None:
    """Which member of ClassWeights validates ``value``: a bad value gets that member's error alone, not one
    per member (the tags hold brackets, so error paths leave them out, as they do pydantic's own tags)."""
    return "list[float]" if isinstance(value, list) else "literal['auto']" if isinstance(value, str) else None


# A list of per-class weights, or "auto" for weights from the training split's class statistics.
ClassWeights = Annotated[
    Annotated[list[Annotated[float, Field(ge=0)]], Field(max_length=100000), Tag("list[float]")]
    | Annotated[Literal["auto"], Tag("literal['auto']")],
    Discriminator(
        _class_weights_member,
        custom_error_type="kiln_type",
        custom_error_message="must be a list of per-class weights, or auto",
    ),
]


class LossSpec(RuleModel):
    name: Name | None = None
    """A single loss by name. Classification: cross_entropy (the default). Segmentation (smp's losses): dice,
    jaccard, focal, lovasz, tversky, cross_entropy (binary cross-entropy when numClasses is 1), bce
    (numClasses 1 only) and presence (trains model.args.aux_params' classification head, beside a mask loss);
    the default is {dice: 0.5, cross_entropy: 0.5}. Detection: model, the sum of the torchvision detector's own
    loss terms (the default; each term is logged on its own, train/loss/classifier, train/loss/box_reg, ...)."""

    weights: Annotated[dict[str, Annotated[float, Field(ge=0)]], Field(max_length=8)] | None = None
    """A weighted sum of named losses, for example {dice: 0.5, cross_entropy: 0.5}; each term is also logged
    on its own (train/loss/dice). Exclusive with name and schedule."""

    schedule: Annotated[list[LossKeyframe], Field(min_length=1, max_length=MAX_LIST)] | None = None
    """Weights that move between the terms over epochs, in place of name and weights: keyframes, for example
    [{epoch: 0, weights: {dice: 0.2, cross_entropy: 0.8}}, {epoch: 20, weights: {dice: 0.8, cross_entropy:
    0.2}}]. Each epoch trains with weights interpolated linearly between the keyframes around it (epoch 10:
    {dice: 0.5, cross_entropy: 0.5}), fixed for the whole epoch; before the first keyframe and after the last
    they hold still. Epochs strictly increase; every keyframe names the same losses. The weights in force are
    logged once per epoch (train/loss_weight/dice). A restart resumes them: they depend on the epoch only."""

    class_weights: ClassWeights | None = None
    """Per-class weights for imbalanced data: a list with one weight per class, or auto. auto derives them
    from the training split's class statistics (class-stats.json in the output: samples per class for
    classification, pixels per class for segmentation) by the balanced rule, total / (classes x count), as
    scikit-learn's compute_class_weight('balanced') does over the classes that occur: a class of average
    frequency gets 1, rarer ones more. A class the training split never shows gets 1, neither boosted nor
    switched off (0 would leave its own focal and dice terms untrained). The weights are logged once.
    Segmentation: multi-class only, applied by cross_entropy, dice, jaccard, focal and tversky (lovasz takes
    none)."""

    __rules__ = (
        Rule(
            cel="!(has(self.name) && has(self.weights))",
            message="name and weights are exclusive: name one loss or weigh several",
            holds=lambda loss: not (loss.name is not None and loss.weights is not None),
            field="weights",
        ),
        Rule(
            cel="!has(self.schedule) || (!has(self.name) && !has(self.weights))",
            message="schedule replaces name and weights: give each keyframe the weights of every term",
            holds=lambda loss: loss.schedule is None or (loss.name is None and loss.weights is None),
            field="schedule",
        ),
        Rule(
            cel="!has(self.schedule) || (self.schedule.map(k, k.epoch).isSorted()"
            " && self.schedule.all(k, self.schedule.exists_one(other, other.epoch == k.epoch)))",
            message="schedule keyframe epochs must strictly increase",
            holds=lambda loss: loss.schedule is None or _strictly_increasing([k.epoch for k in loss.schedule]),
            field="schedule",
        ),
        Rule(
            cel="!has(self.schedule) || self.schedule.all(k, size(k.weights) == size(self.schedule[0].weights)"
            " && k.weights.all(name, name in self.schedule[0].weights))",
            message="every schedule keyframe must weigh the same losses (weight 0 switches one off)",
            holds=lambda loss: loss.schedule is None or _same_terms([k.weights for k in loss.schedule]),
            field="schedule",
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
