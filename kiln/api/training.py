"""TrainingJob.spec: what a user writes to train a vision model.

Names that resolve through a registry at run time (timm architectures, optimizers, albumentations
transforms and their arguments, losses, metrics) are free strings in the schema, which cannot enumerate
thousands of them; ``kiln.api.semantics`` checks each against the generated name catalogue
(``kiln.api.catalogue``), so ``kiln validate`` and the operator refuse a typo with the closest valid names.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from kiln.api.base import Name, Rule, RuleModel
from kiln.api.data import FORMATS_BY_TASK, AugmentationSpec, DataSpec, Task
from kiln.api.learning import (
    CheckpointSpec,
    EarlyStoppingSpec,
    EmaSpec,
    LossSpec,
    OptimizerSpec,
    OutputSpec,
    SchedulerSpec,
    ValidationSpec,
)
from kiln.api.model import ModelSpec, transfer_rules
from kiln.api.runtime import ResourcesSpec, RunPolicy, StorageSpec
from kiln.api.tracking import TrackingSpec

Precision = Literal["auto", "fp32", "bf16", "fp16"]


def _formats_rule(split: str) -> Rule:
    cel_table = " && ".join(
        f"(self.task != '{task}' || !has(self.data.{split}) || self.data.{split}.format in {list(formats)})"
        for task, formats in FORMATS_BY_TASK.items()
    )
    return Rule(
        cel=cel_table,
        message=f"data.{split}.format does not fit the task: "
        + "; ".join(f"{task} reads {', '.join(formats)}" for task, formats in FORMATS_BY_TASK.items()),
        holds=lambda spec: (split_ := getattr(spec.data, split)) is None or split_.format in FORMATS_BY_TASK[spec.task],
        field=f"data.{split}.format",
    )


class TrainingJobSpec(RuleModel):
    task: Task
    """What is learned: classification, segmentation or detection."""

    model: ModelSpec
    """The network."""

    data: DataSpec
    """Datasets and loading."""

    augmentation: AugmentationSpec = Field(default_factory=AugmentationSpec)
    """Training-time augmentation."""

    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    """The optimizer."""

    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec)
    """The learning-rate schedule."""

    loss: LossSpec = Field(default_factory=LossSpec)
    """The loss."""

    epochs: Annotated[int, Field(ge=0, le=100000)] = 10
    """Passes over the training split. 0 trains nothing: the weights of checkpoint.resume are evaluated on data.val
    and data.test (evaluation.json, predictions, pictures, as at the end of a run), and data.train is not read."""

    seed: Annotated[int, Field(ge=0, le=2**31 - 1)] = 0
    """Random seed, offset by rank for data order."""

    precision: Precision = "auto"
    """auto picks bf16 where the accelerator supports it, fp16 with a GradScaler on older GPUs, else fp32."""

    channels_last: bool = False
    """Use the channels_last memory format (faster convolutions on tensor cores)."""

    compile: bool = False
    """Wrap the model in torch.compile."""

    grad_accumulation: Annotated[int, Field(ge=1, le=1024)] = 1
    """Micro-batches per optimizer step."""

    grad_clip: Annotated[float, Field(ge=0)] = 0.0
    """Clip the gradient norm to this value; 0 turns clipping off."""

    ema: EmaSpec = Field(default_factory=EmaSpec)
    """Exponential moving average of the weights."""

    early_stopping: EarlyStoppingSpec | None = None
    """Stop when the validation metric stops improving. Off when omitted."""

    validation: ValidationSpec = Field(default_factory=ValidationSpec)
    """When to validate and which metric decides the best checkpoint."""

    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    """Checkpoint location, cadence, retention and resume."""

    output: OutputSpec = Field(default_factory=OutputSpec)
    """Where metrics and predictions go."""

    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    """Experiment tracking: TensorBoard event files always go under output.uri/tensorboard; MLflow is optional."""

    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    """Nodes, processes, GPUs and placement."""

    image: Name | None = None
    """Trainer container image. Defaults to the operator's configured image."""

    storage: StorageSpec = Field(default_factory=StorageSpec)
    """S3 connection settings."""

    run_policy: RunPolicy = Field(default_factory=RunPolicy)
    """Restarts, suspension, deadlines and queueing. suspend, maxRestarts, retriableExitCodes,
    activeDeadlineSeconds and ttlSecondsAfterFinished take effect at once; see docs/operations.md for the rest."""

    __rules__ = (
        _formats_rule("train"),
        _formats_rule("val"),
        _formats_rule("test"),
        Rule(
            cel="self.task == 'classification' || (self.augmentation.mixup == 0.0 && self.augmentation.cutmix == 0.0)",
            message="mixup and cutmix apply only to classification",
            holds=lambda s: s.task == "classification" or (s.augmentation.mixup == 0 and s.augmentation.cutmix == 0),
            field="augmentation",
        ),
        Rule(
            cel="(self.augmentation.mixup == 0.0 && self.augmentation.cutmix == 0.0) || self.data.batchSize % 2 == 0",
            message="mixup and cutmix pair each image with another in its batch: data.batchSize must be even",
            holds=lambda s: (s.augmentation.mixup == 0 and s.augmentation.cutmix == 0) or s.data.batch_size % 2 == 0,
            field="data.batchSize",
        ),
        Rule(
            cel="self.task != 'segmentation' || has(self.model.encoder)",
            message="segmentation needs model.encoder (for example resnet34)",
            holds=lambda s: s.task != "segmentation" or s.model.encoder is not None,
            field="model.encoder",
        ),
        Rule(
            cel="self.task != 'segmentation' || has(self.model.numClasses)",
            message="segmentation needs model.numClasses: masks hold class indices but do not list the classes",
            holds=lambda s: s.task != "segmentation" or s.model.num_classes is not None,
            field="model.numClasses",
        ),
        Rule(
            cel="!has(self.data.ignoreIndex) || self.task == 'segmentation'",
            message="data.ignoreIndex applies to segmentation masks only",
            holds=lambda s: s.data.ignore_index is None or s.task == "segmentation",
            field="data.ignoreIndex",
        ),
        Rule(
            cel="!has(self.data.ignoreIndex) || !has(self.model.numClasses)"
            " || (self.data.ignoreIndex >= self.model.numClasses && self.data.ignoreIndex >= 2)",
            message="data.ignoreIndex must not be a class index: at least model.numClasses, and 2 for binary masks",
            holds=lambda s: (
                s.data.ignore_index is None
                or s.model.num_classes is None
                or s.data.ignore_index >= max(s.model.num_classes, 2)
            ),
            field="data.ignoreIndex",
        ),
        Rule(
            cel="!has(self.data.palette) || self.task == 'segmentation'",
            message="data.palette maps mask colours to classes: it applies to segmentation only",
            holds=lambda s: s.data.palette is None or s.task == "segmentation",
            field="data.palette",
        ),
        Rule(
            cel="!has(self.data.palette) || !has(self.model.numClasses)"
            " || self.data.palette.size() == (self.model.numClasses == 1 ? 2 : self.model.numClasses)",
            message="data.palette needs one colour per class: model.numClasses of them, 2 for binary masks"
            " (background, then foreground)",
            holds=lambda s: (
                s.data.palette is None
                or s.model.num_classes is None
                or len(s.data.palette) == max(s.model.num_classes, 2)
            ),
            field="data.palette",
        ),
        Rule(
            cel="!has(self.model.encoder) || self.task == 'segmentation'",
            message="model.encoder applies to segmentation only; the architecture names the whole network",
            holds=lambda s: s.model.encoder is None or s.task == "segmentation",
            field="model.encoder",
        ),
        Rule(
            cel="!has(self.model.classNames) || self.task == 'detection'",
            message="model.classNames applies to detection only; classification reads class names from its data",
            holds=lambda s: s.model.class_names is None or s.task == "detection",
            field="model.classNames",
        ),
        *transfer_rules("segmentation", "encoder"),
        *transfer_rules("classification", "backbone"),
        Rule(
            cel="!has(self.earlyStopping) || self.validation.every <= self.epochs",
            message="earlyStopping needs validation.every <= epochs, or it never sees a validation",
            holds=lambda s: s.early_stopping is None or s.validation.every <= s.epochs,
            field="earlyStopping",
        ),
        Rule(
            cel="self.epochs > 0 || !(self.checkpoint.resume in ['auto', 'never'])",
            message="epochs 0 evaluates a checkpoint without training: checkpoint.resume must name it (an s3:// URI or"
            " a path)",
            holds=lambda s: s.epochs > 0 or s.checkpoint.resume not in ("auto", "never"),
            field="checkpoint.resume",
        ),
        Rule(
            cel="self.epochs > 0 || has(self.data.val) || has(self.data.test)",
            message="epochs 0 evaluates on data.val or data.test: give one (valSplit holds out part of data.train,"
            " which epochs 0 does not read)",
            holds=lambda s: s.epochs > 0 or s.data.val is not None or s.data.test is not None,
            field="data",
        ),
        Rule(cel="self.task == oldSelf.task", message="task is immutable once the job exists"),
        Rule(cel="self.model == oldSelf.model", message="model is immutable once the job exists", field="model"),
        Rule(cel="self.data == oldSelf.data", message="data is immutable once the job exists", field="data"),
        Rule(
            cel="self.resources.nodes == oldSelf.resources.nodes",
            message="resources.nodes is immutable once the job exists",
            field="resources.nodes",
        ),
        # Optional fields: neither set, unset nor changed after creation.
        Rule(
            cel="has(self.checkpoint.uri) == has(oldSelf.checkpoint.uri)"
            " && (!has(self.checkpoint.uri) || self.checkpoint.uri == oldSelf.checkpoint.uri)",
            message="checkpoint.uri is immutable once the job exists: a new location would train from scratch",
            field="checkpoint.uri",
        ),
        Rule(
            cel="has(self.output.uri) == has(oldSelf.output.uri)"
            " && (!has(self.output.uri) || self.output.uri == oldSelf.output.uri)",
            message="output.uri is immutable once the job exists: metrics and predictions would split in two",
            field="output.uri",
        ),
        Rule(
            cel="has(self.image) == has(oldSelf.image) && (!has(self.image) || self.image == oldSelf.image)",
            message="image is immutable once the job exists: attempts would run different trainers",
            field="image",
        ),
    )
