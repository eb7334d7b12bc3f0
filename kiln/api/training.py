"""TrainingJob.spec: what a user writes to train a vision model.

Names that resolve through a registry at run time (timm architectures, optimizers, albumentations
transforms, loss names) are free strings here: the torch-free API cannot list them, and the trainer's
registries reject unknown ones with the list of valid names.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator

from kiln.api.base import MAX_LIST, MAX_MAP, MAX_NAME, KilnModel, Name, Rule, RuleModel, Uri
from kiln.api.runtime import ResourcesSpec, RunPolicy, StorageSpec

Task = Literal["classification", "segmentation", "detection"]
DataFormat = Literal["imagefolder", "csv", "segmentation-folder", "coco", "yolo"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]
SchedulerName = Literal["cosine", "step", "multistep", "exponential", "plateau", "onecycle", "none"]
MetricMode = Literal["max", "min"]
AugmentationPreset = Literal["none", "light", "medium", "heavy"]
StagingMode = Literal["auto", "copy", "direct"]

# Which data formats each task can read; the CEL rule and the Python check both come from this table.
FORMATS_BY_TASK: dict[str, tuple[str, ...]] = {
    "classification": ("imagefolder", "csv"),
    "segmentation": ("segmentation-folder",),
    "detection": ("coco", "yolo"),
}


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


class ModelSpec(RuleModel):
    architecture: Annotated[str, Field(min_length=1, max_length=MAX_NAME)]
    """The network. Classification: any timm model name (resnet18, convnext_tiny, vit_small_patch16_224, ...).
    Segmentation: a segmentation-models-pytorch architecture (unet, unetplusplus, fpn, deeplabv3plus, ...).
    Detection: a torchvision detector (fasterrcnn_resnet50_fpn_v2, retinanet_resnet50_fpn, ...)."""

    encoder: Name | None = None
    """Segmentation only: the encoder (backbone) of the smp architecture, for example resnet34."""

    num_classes: Annotated[int, Field(ge=1, le=100000)] | None = None
    """Number of classes. Inferred from the training data when omitted; an explicit value must agree with it."""

    pretrained: Uri | None = None
    """Initial weights as an explicit URI: s3://bucket/key or a file path. Omit to start from random weights.
    There is no model hub at run time, so names like 'imagenet' are rejected."""

    source: Name | None = None
    """A custom model plugin: 'package.module:factory', or the name of an entry point in group 'kiln.models'.
    The factory is called with num_classes and returns a torch.nn.Module. Ship the package in your image."""

    @field_validator("pretrained", mode="before")
    @classmethod
    def _no_hub(cls, value: Any) -> Any:
        if value is False:
            return None
        if value is True:
            raise ValueError("true needs a model hub, and there is none at run time; give a weights URI")
        return value

    __rules__ = (
        Rule(
            cel="!has(self.pretrained) || self.pretrained.startsWith('s3://') || self.pretrained.startsWith('/')"
            " || self.pretrained.startsWith('.') || self.pretrained.startsWith('file://')",
            message="pretrained must be an s3:// URI or a file path",
            holds=lambda m: m.pretrained is None or m.pretrained.startswith(("s3://", "/", ".", "file://")),
            field="pretrained",
        ),
    )


class DataSource(KilnModel):
    uri: Uri
    """Where the split lives: s3://bucket/prefix, or a local path."""

    format: DataFormat = "imagefolder"
    """Layout: imagefolder (one folder per class), csv (path,label rows), segmentation-folder (images/ and
    masks/ with matching names), coco (annotations JSON) or yolo (images/ and labels/)."""


class Staging(KilnModel):
    mode: StagingMode = "auto"
    """copy: download S3 data to a node-local cache once per node before training. direct: read local paths
    in place. auto: copy for s3:// URIs, direct for local paths."""

    cache_dir: Annotated[str, Field(max_length=1024)] | None = None
    """Node-local cache directory. Defaults to $KILN_CACHE_DIR, else ~/.cache/kiln/data."""

    parallelism: Annotated[int, Field(ge=1, le=256)] = 16
    """Concurrent downloads while staging."""


class Normalization(KilnModel):
    mean: Annotated[list[float], Field(min_length=1, max_length=4)]
    """Per-channel mean, on the 0..1 scale."""

    std: Annotated[list[Annotated[float, Field(gt=0)]], Field(min_length=1, max_length=4)]
    """Per-channel standard deviation, on the 0..1 scale."""


class DataSpec(RuleModel):
    train: DataSource
    """The training split."""

    val: DataSource | None = None
    """The validation split. Exclusive with valSplit."""

    val_split: Annotated[float, Field(gt=0, lt=1)] | None = None
    """Hold out this fraction of the training split for validation, instead of a separate val split."""

    test: DataSource | None = None
    """The test split, evaluated once at the end on the best checkpoint; per-image predictions are written."""

    image_size: Annotated[int, Field(ge=8, le=4096)] = 224
    """Square input size in pixels that images are resized to."""

    batch_size: Annotated[int, Field(ge=1, le=65536)] = 32
    """Batch size per process. The global batch is batchSize x world size x gradAccumulation."""

    workers: Annotated[int, Field(ge=0, le=64)] = 4
    """DataLoader worker processes per training process."""

    normalize: Normalization | None = None
    """Override the input normalization. By default it comes from the model's own pretrained config."""

    staging: Staging = Field(default_factory=Staging)
    """How remote data is brought to the node."""

    __rules__ = (
        Rule(
            cel="!(has(self.val) && has(self.valSplit))",
            message="val and valSplit are exclusive: give a val split or a fraction to hold out, not both",
            holds=lambda d: not (d.val is not None and d.val_split is not None),
            field="valSplit",
        ),
    )


class Transform(KilnModel):
    name: Name
    """An albumentations transform, by its class name (HorizontalFlip, RandomResizedCrop, ColorJitter, ...)."""

    args: Annotated[
        dict[str, Any], Field(max_length=MAX_MAP, json_schema_extra={"x-kubernetes-preserve-unknown-fields": True})
    ] = Field(default_factory=dict)
    """Keyword arguments passed to the transform's constructor, verbatim."""


class AugmentationSpec(KilnModel):
    preset: AugmentationPreset = "light"
    """A ready-made training pipeline. Ignored when transforms is given."""

    transforms: Annotated[list[Transform], Field(max_length=MAX_LIST)] | None = None
    """An explicit albumentations pipeline for training, applied before resize and normalization."""

    mixup: Annotated[float, Field(ge=0, le=10)] = 0.0
    """Mixup alpha; 0 turns it off. Classification only."""

    cutmix: Annotated[float, Field(ge=0, le=10)] = 0.0
    """CutMix alpha; 0 turns it off. Classification only."""

    label_smoothing: Annotated[float, Field(ge=0, lt=1)] = 0.0
    """Label smoothing for the classification loss."""


class OptimizerSpec(KilnModel):
    name: Name = "adamw"
    """sgd, adam, adamw, rmsprop, or any name timm's create_optimizer_v2 knows (lamb, lion, adan, ...)."""

    lr: Annotated[float, Field(gt=0, le=10)] = 1e-3
    """Peak learning rate, reached after warmup."""

    weight_decay: Annotated[float, Field(ge=0, le=10)] = 0.05
    """Decoupled weight decay; biases and norm weights are exempt."""

    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9
    """Momentum, for the optimizers that have one (sgd, rmsprop)."""

    betas: Annotated[list[Annotated[float, Field(ge=0, lt=1)]], Field(min_length=2, max_length=2)] = Field(
        default_factory=lambda: [0.9, 0.999]
    )
    """Adam-family betas, [beta1, beta2]."""


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
    """A single loss by name. Defaults per task: cross_entropy for classification, dice+cross_entropy for
    segmentation; detection models compute their own."""

    weights: Annotated[dict[str, Annotated[float, Field(ge=0)]], Field(max_length=8)] | None = None
    """A weighted sum of named losses, for example {dice: 0.5, cross_entropy: 0.5}. Exclusive with name."""

    class_weights: Annotated[list[Annotated[float, Field(ge=0)]], Field(max_length=100000)] | None = None
    """Per-class weights, one per class, for imbalanced data."""

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
    uri: Uri | None = None
    """Where checkpoints go: s3://bucket/prefix or a local directory. Defaults to <output.uri>/checkpoints."""

    every_epochs: Annotated[int, Field(ge=0, le=10000)] = 1
    """Save every this many epochs; 0 turns epoch checkpoints off."""

    every_steps: Annotated[int, Field(ge=0)] = 0
    """Also save every this many optimizer steps; 0 turns step checkpoints off."""

    keep_last: Annotated[int, Field(ge=1, le=1000)] = 2
    """How many of the most recent checkpoints to keep."""

    keep_best: Annotated[int, Field(ge=0, le=1000)] = 1
    """How many of the best-scoring checkpoints to keep besides them."""

    resume: Uri = "auto"
    """auto: continue from this job's latest checkpoint if there is one. never: always start over.
    Anything else is the URI of a checkpoint to start from."""


class OutputSpec(KilnModel):
    uri: Uri | None = None
    """Where metrics.jsonl, summary.json and predictions go. Defaults to ./.kiln/<job> locally, or to the
    operator's configured root in a cluster."""


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

    epochs: Annotated[int, Field(ge=1, le=100000)] = 10
    """Passes over the training split."""

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

    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    """Nodes, processes, GPUs and placement."""

    image: Name | None = None
    """Trainer container image. Defaults to the operator's configured image."""

    storage: StorageSpec = Field(default_factory=StorageSpec)
    """S3 connection settings."""

    run_policy: RunPolicy = Field(default_factory=RunPolicy)
    """Restarts, suspension, deadlines and queueing. The only part that may change while the job runs."""

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
            cel="self.task != 'segmentation' || has(self.model.encoder)",
            message="segmentation needs model.encoder (for example resnet34)",
            holds=lambda s: s.task != "segmentation" or s.model.encoder is not None,
            field="model.encoder",
        ),
        Rule(
            cel="!has(self.earlyStopping) || self.validation.every <= self.epochs",
            message="earlyStopping needs validation.every <= epochs, or it never sees a validation",
            holds=lambda s: s.early_stopping is None or s.validation.every <= s.epochs,
            field="earlyStopping",
        ),
        Rule(cel="self.task == oldSelf.task", message="task is immutable once the job exists"),
        Rule(cel="self.model == oldSelf.model", message="model is immutable once the job exists", field="model"),
        Rule(cel="self.data == oldSelf.data", message="data is immutable once the job exists", field="data"),
        Rule(
            cel="self.resources.nodes == oldSelf.resources.nodes",
            message="resources.nodes is immutable once the job exists",
            field="resources.nodes",
        ),
    )
