"""TrainingJob.spec.model: the network, extra arguments for its constructor, and transfer learning.

``model.args`` is free-form in the schema (its keys are whatever the constructor takes); ``kiln.api.semantics``
refuses the ones Kiln passes itself and, for smp architectures, any the constructor does not take. The transfer
fields act on the part of the network a task treats as pretrained, so each task has its own pair and
``transfer_rules`` (CEL and pydantic, on TrainingJobSpec, which knows the task) refuses the other task's.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field, field_validator
from pydantic.alias_generators import to_snake

from kiln.api.base import MAX_MAP, MAX_NAME, KilnModel, Name, Rule, RuleModel, StorageUri

# Transfer learning acts on a task's pretrained part: the segmentation encoder, the classifier's backbone.
# Each task takes its own pair of fields, (freeze, lr scale), and refuses the other task's.
TRANSFER_FIELDS: dict[str, tuple[str, str]] = {
    "segmentation": ("freezeEncoder", "encoderLrScale"),
    "classification": ("freezeBackbone", "backboneLrScale"),
}


def _only_for(task: str, field: str) -> Rule:
    """model.<field> is refused on other tasks, with a pointer to what they use instead."""
    attribute = to_snake(field)
    others = "; ".join(f"{t} uses model.{f} and model.{s}" for t, (f, s) in TRANSFER_FIELDS.items() if t != task)
    return Rule(
        cel=f"!has(self.model.{field}) || self.task == '{task}'",
        message=f"model.{field} applies to {task} only; {others}",
        holds=lambda spec: getattr(spec.model, attribute) is None or spec.task == task,
        field=f"model.{field}",
    )


def transfer_rules(task: str, part: str) -> tuple[Rule, ...]:
    """TrainingJobSpec rules for the task's transfer fields: refused on other tasks, and a freeze shorter than the
    run."""
    freeze, scale = TRANSFER_FIELDS[task]
    attribute = to_snake(freeze)
    frozen_too_long = Rule(
        cel=f"!has(self.model.{freeze}) || self.model.{freeze}.epochs < self.epochs",
        message=f"model.{freeze}.epochs must be less than epochs, or the {part} never trains",
        holds=lambda spec: (f := getattr(spec.model, attribute)) is None or f.epochs < spec.epochs,
        field=f"model.{freeze}.epochs",
    )
    return _only_for(task, freeze), _only_for(task, scale), frozen_too_long


# Constructor arguments Kiln passes itself, each with the spec field that sets it: model.args may not repeat
# them (kiln.api.semantics and the trainer both refuse one, naming the field).
KILN_MODEL_ARGS: dict[str, str] = {
    "num_classes": "model.numClasses",
    "classes": "model.numClasses",
    "encoder_name": "model.encoder",
    "encoder_weights": "model.pretrained",
    "pretrained": "model.pretrained",
    "weights": "model.pretrained",  # torchvision's builders
    "weights_backbone": "model.pretrained",
    "progress": "model.pretrained",  # torchvision's download progress bar: there is no download
}
# smp arguments segmentation refuses in model.args (and in its aux_params): Kiln's losses and metrics take
# logits, which an activation would turn into probabilities.
SEGMENTATION_LOGITS_ONLY = {"activation": "Kiln's losses and metrics take logits; leave activation out"}


# Detection datasets with more classes than this are not named by hand in a spec.
MAX_CLASS_NAMES = 1024


class FreezeSpec(KilnModel):
    epochs: Annotated[int, Field(ge=1, le=100000)]
    """Epochs, from the first, that train with the part frozen: its parameters get no gradient and its
    BatchNorm layers keep their running statistics. Epoch epochs+1 unfreezes it, for the rest of the run. Less
    than spec.epochs, so the part trains for at least one epoch."""


class ModelSpec(RuleModel):
    architecture: Annotated[str, Field(min_length=1, max_length=MAX_NAME)]
    """The network. Classification: a Kiln flavor (debug, debug_small) or any timm model name (resnet18,
    convnext_tiny, vit_small_patch16_224, ...). Segmentation: a segmentation-models-pytorch architecture, any
    case (unet, UnetPlusPlus, fpn, deeplabv3plus, segformer, ...). Detection: a torchvision detector
    (fasterrcnn_resnet50_fpn, fasterrcnn_resnet50_fpn_v2, fasterrcnn_mobilenet_v3_large_fpn,
    fasterrcnn_mobilenet_v3_large_320_fpn, retinanet_resnet50_fpn, retinanet_resnet50_fpn_v2, fcos_resnet50_fpn,
    ssd300_vgg16, ssdlite320_mobilenet_v3_large), built with random weights and its input transform sized to
    data.imageSize. Ignored when source names a plugin."""

    encoder: Name | None = None
    """Segmentation only: the encoder (backbone) of the smp architecture, for example resnet34,
    efficientnet-b0, or tu-<any timm model>. Built with random weights; load trained ones with pretrained."""

    num_classes: Annotated[int, Field(ge=1, le=100000)] | None = None
    """Number of classes. Classification: inferred from the training data when omitted; an explicit value must
    agree with it. Segmentation: required (masks do not list their classes); mask pixels hold class indices
    0..numClasses-1, and numClasses 1 is binary segmentation (masks of 0 and 1, a sigmoid output). Detection:
    the object classes, background not counted (Kiln adds torchvision's background class itself); inferred from
    the training data when omitted, an explicit value must agree with it."""

    class_names: Annotated[list[Name], Field(min_length=1, max_length=MAX_CLASS_NAMES)] | None = None
    """Detection only: the object classes in class-id order (class k is classNames[k]). voc: the classes to
    read, in this order (omitted: the sorted names found in the training annotations); a name not listed is an
    invalid input naming the file. coco and yolo name their classes themselves: given here, they must match."""

    pretrained: StorageUri | None = None
    """Initial weights as an explicit URI: s3://bucket/key or a file path. Omit to start from random weights.
    There is no model hub at run time, so names like 'imagenet' are rejected. Tensors that match by name and
    shape are loaded; for segmentation the file may also hold the encoder's weights alone."""

    source: Name | None = None
    """A custom model plugin: 'package.module:factory', or the name of an entry point in group 'kiln.models'.
    The factory is called with num_classes and returns a torch.nn.Module. Ship the package in your image."""

    args: Annotated[
        dict[str, Any], Field(max_length=MAX_MAP, json_schema_extra={"x-kubernetes-preserve-unknown-fields": True})
    ] = Field(default_factory=dict)
    """Extra keyword arguments for the network's constructor, passed verbatim. Classification: timm.create_model's
    (drop_rate, drop_path_rate, ...). Segmentation: the smp architecture's (decoder_channels,
    decoder_attention_type, ...); a tu- encoder's timm model takes the rest. aux_params adds smp's
    classification head: it learns which classes each image's mask contains, through the presence loss (add
    presence to loss.weights); metrics and predictions use the masks alone. Detection: the torchvision
    builder's, model class's and input transform's (min_size, max_size, box_score_thresh,
    box_detections_per_img, ...; min_size and max_size default to data.imageSize, image_mean and image_std to
    data.normalize, else the network's own; torchvision honours trainable_backbone_layers only with its own
    backbone weights, which Kiln never downloads). With source: the plugin factory's. Kiln sets num_classes
    (classes), encoder_name, encoder_weights, pretrained, weights, weights_backbone and progress from
    numClasses, encoder and pretrained, so they are refused here, as is segmentation's activation (the losses
    take logits) and an argument the constructor does not take (by kiln validate for smp and torchvision
    architectures, else when the trainer starts, exit 2)."""

    freeze_encoder: FreezeSpec | None = None
    """Segmentation only: train the first epochs with the encoder frozen (the decoder and head learn on a fixed
    pretrained encoder), then the whole network. Off when omitted."""

    encoder_lr_scale: Annotated[float, Field(gt=0, le=1)] | None = None
    """Segmentation only: the encoder's learning rate is optimizer.lr times this (0 < x <= 1), through warmup and
    the schedule alike; the decoder and head keep optimizer.lr. Omit for one learning rate."""

    freeze_backbone: FreezeSpec | None = None
    """Classification only: train the first epochs with the backbone (everything but the classifier head, timm's
    pretrained_cfg classifier) frozen, then the whole network. Off when omitted."""

    backbone_lr_scale: Annotated[float, Field(gt=0, le=1)] | None = None
    """Classification only: the backbone's learning rate is optimizer.lr times this (0 < x <= 1), through warmup
    and the schedule alike; the classifier head keeps optimizer.lr. Omit for one learning rate."""

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
