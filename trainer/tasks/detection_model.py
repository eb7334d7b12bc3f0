"""The detection network: a torchvision detector by name, with random weights, model.args, its input transform
sized to data.imageSize, and weights from model.pretrained (a Kiln checkpoint or a torchvision state dict).

Background: every detector here (Faster R-CNN, RetinaNet, FCOS, SSD) counts it in ``num_classes`` and keeps
label 0 for it (torchvision's docs: "number of output classes of the model (including the background)";
roi_heads drops label 0, SSD's loss treats it as the negative class, RetinaNet and FCOS never make a one-hot
target of it). Kiln's data is 0-based without background, so the network gets classes + 1, targets are
shifted up by one (``to_targets``) and predictions down by one, with any label-0 detection dropped
(``from_detections``): RetinaNet and FCOS can still score their never-trained channel 0.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torchvision.models.detection as tvd
from torch import nn

from kiln.api.catalogue import unknown_name_message
from kiln.api.model import KILN_MODEL_ARGS
from kiln.api.resolve import ResolvedTrainingJob
from kiln.trainer.errors import InvalidInput
from kiln.trainer.models import build_model, construct, load_pretrained, model_args
from kiln.trainer.registry import Registry

Builder = Callable[..., nn.Module]


@dataclass(frozen=True)
class DetectorInfo:
    name: str
    build: Builder
    model: type[nn.Module]
    """The class the builder returns; its constructor takes the keywords the builder passes on."""
    sized: bool
    """Whether the network's transform takes min_size/max_size (R-CNN, RetinaNet, FCOS); SSD models resize every
    image to the fixed size their anchors were designed for (300 or 320 px)."""
    description: str


DETECTORS: Registry[DetectorInfo] = Registry("detection architecture (a torchvision detector)")
for _name, _build, _model, _sized, _text in (
    ("fasterrcnn_resnet50_fpn", tvd.fasterrcnn_resnet50_fpn, tvd.FasterRCNN, True, "Faster R-CNN, ResNet-50 FPN"),
    (
        "fasterrcnn_resnet50_fpn_v2",
        tvd.fasterrcnn_resnet50_fpn_v2,
        tvd.FasterRCNN,
        True,
        "Faster R-CNN v2 (improved recipe)",
    ),
    (
        "fasterrcnn_mobilenet_v3_large_fpn",
        tvd.fasterrcnn_mobilenet_v3_large_fpn,
        tvd.FasterRCNN,
        True,
        "Faster R-CNN, MobileNetV3",
    ),
    (
        "fasterrcnn_mobilenet_v3_large_320_fpn",
        tvd.fasterrcnn_mobilenet_v3_large_320_fpn,
        tvd.FasterRCNN,
        True,
        "Faster R-CNN, MobileNetV3, for low resolution",
    ),
    ("retinanet_resnet50_fpn", tvd.retinanet_resnet50_fpn, tvd.RetinaNet, True, "RetinaNet, ResNet-50 FPN"),
    ("retinanet_resnet50_fpn_v2", tvd.retinanet_resnet50_fpn_v2, tvd.RetinaNet, True, "RetinaNet v2"),
    ("fcos_resnet50_fpn", tvd.fcos_resnet50_fpn, tvd.FCOS, True, "FCOS, ResNet-50 FPN (anchor-free)"),
    ("ssd300_vgg16", tvd.ssd300_vgg16, tvd.ssd.SSD, False, "SSD300, VGG-16 (resizes to 300 px)"),
    ("ssdlite320_mobilenet_v3_large", tvd.ssdlite320_mobilenet_v3_large, tvd.ssd.SSD, False, "SSDlite (320 px)"),
):
    DETECTORS.register(DetectorInfo(_name, _build, _model, _sized, _text))

# What a detector's own input transform takes beyond min_size, max_size, image_mean and image_std; the model
# classes hand their remaining keywords to it, and it takes (and silently drops) any keyword at all, so Kiln
# checks model.args against this list and the constructors' own parameters.
TRANSFORM_ARGS = frozenset({"size_divisible", "fixed_size"})
# Set by the network (SSD's fixed size) or by Kiln's data rather than by model.args.
NOT_ARGS = frozenset({"self", "kwargs", "backbone", "anchor_generator", "head", "size"})


def transform_args(job: ResolvedTrainingJob, info: DetectorInfo) -> dict[str, Any]:
    """What Kiln sets on the network's own input transform unless model.args does: min_size and max_size at
    data.imageSize (images arrive padded to that square; torchvision's default of 800 px would upscale them, for
    no information and many times the compute), and image_mean/image_std from data.normalize. Without
    data.normalize the network keeps its own (ImageNet's, or 0.5 for SSDlite)."""
    size, normalize = job.spec.data.image_size, job.spec.data.normalize
    args: dict[str, Any] = {"min_size": size, "max_size": size} if info.sized else {}
    if normalize is not None:
        args.update(image_mean=list(normalize.mean), image_std=list(normalize.std))
    return args


def build_detector(job: ResolvedTrainingJob, num_classes: int) -> nn.Module:
    """The detector for ``num_classes`` object classes (background added here)."""
    spec = job.spec.model
    if spec.source:  # a plugin builds the whole network, with whatever head convention it likes
        return build_model(spec, num_classes + 1, job.spec.storage)
    info = DETECTORS.get(spec.architecture)
    given = model_args(spec)
    valid = accepted_args(info)
    for key in sorted(given.keys() - valid):
        reason = unknown_name_message(f"{spec.architecture} argument", key, valid - KILN_MODEL_ARGS.keys())
        raise InvalidInput(f"model.args.{key}: {reason}")
    args = {**transform_args(job, info), **given}
    # weights and weights_backbone are None always: no model hub at run time; weights come from model.pretrained.
    model = construct(
        info.build, spec.architecture, args, weights=None, weights_backbone=None, num_classes=num_classes + 1
    )
    if spec.pretrained:
        load_pretrained(model, spec.pretrained, job.spec.storage)
    return model


def accepted_args(info: DetectorInfo) -> frozenset[str]:
    """The keywords model.args may give a detector: its builder's, its model class's and its transform's."""
    takes = {*inspect.signature(info.build).parameters, *inspect.signature(info.model).parameters, *TRANSFORM_ARGS}
    if not info.sized:  # SSD sets its transform's size itself
        takes -= {"min_size", "max_size", *TRANSFORM_ARGS}
    return frozenset(takes - NOT_ARGS)


def to_targets(boxes: Sequence[torch.Tensor], labels: Sequence[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Kiln's per-image boxes and 0-based labels as torchvision targets (label 0 is the background)."""
    return [{"boxes": b, "labels": k + 1} for b, k in zip(boxes, labels, strict=True)]


def from_detections(detections: Sequence[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """torchvision's detections with 0-based labels; a detection of the background class is no detection."""
    out = []
    for detection in detections:
        keep = detection["labels"] > 0
        out.append(
            {
                "boxes": detection["boxes"][keep],
                "scores": detection["scores"][keep],
                "labels": detection["labels"][keep] - 1,
            }
        )
    return out


def check_classes(declared: int | None, names: Sequence[str]) -> None:
    if declared is not None and declared != len(names):
        shown = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
        raise InvalidInput(f"model.numClasses is {declared} but data.train has {len(names)} classes ({shown})")
