"""Albumentations pipelines: presets and explicit transform lists, resolved by name through a registry.

Training applies the augmentation first, then resize and normalize; evaluation applies only the latter two.
Called with ``mask=`` (segmentation), the same geometric transforms move the mask; it is resized
nearest-neighbour, so it keeps only the class indices it had.

Detection has its own presets and pipelines: bbox-aware (``A.BboxParams``, called with ``bboxes=`` in xyxy
pixels and ``labels=``), ending with the longer side resized to the image size and zero padding at the bottom
right (so box coordinates need no offset), scaled to 0..1 but not normalized: torchvision detectors normalize
inside the model.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

import albumentations as A
import cv2
from albumentations.core.type_definitions import Targets
from albumentations.pytorch import ToTensorV2

from kiln.api.data import AugmentationSpec, Transform
from kiln.trainer.errors import InvalidInput
from kiln.trainer.registry import Registry


@dataclass(frozen=True)
class TransformInfo:
    name: str
    cls: type[A.BasicTransform]


@dataclass(frozen=True)
class PresetInfo:
    name: str
    transforms: Callable[[int], list[Transform]]
    description: str


@cache
def transforms_registry() -> Registry[TransformInfo]:
    """Every public albumentations transform class, by class name."""
    registry: Registry[TransformInfo] = Registry("albumentations transform")
    for name in dir(A):
        candidate = getattr(A, name)
        if isinstance(candidate, type) and issubclass(candidate, A.BasicTransform) and not name.startswith("_"):
            registry.register(TransformInfo(name, candidate))
    return registry


PRESETS: Registry[PresetInfo] = Registry("augmentation preset")
PRESETS.register(PresetInfo("none", lambda size: [], "no augmentation"))
PRESETS.register(PresetInfo("light", lambda size: [Transform(name="HorizontalFlip")], "horizontal flips"))
PRESETS.register(
    PresetInfo(
        "medium",
        lambda size: [
            Transform(name="RandomResizedCrop", args={"size": [size, size], "scale": [0.5, 1.0]}),
            Transform(name="HorizontalFlip"),
            Transform(name="ColorJitter", args={"brightness": 0.2, "contrast": 0.2, "saturation": 0.2, "p": 0.5}),
        ],
        "random resized crops, flips and colour jitter",
    )
)
PRESETS.register(
    PresetInfo(
        "heavy",
        lambda size: [
            Transform(name="RandomResizedCrop", args={"size": [size, size], "scale": [0.25, 1.0]}),
            Transform(name="HorizontalFlip"),
            Transform(name="Affine", args={"rotate": [-15, 15], "shear": [-8, 8], "p": 0.5}),
            Transform(name="ColorJitter", args={"brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "p": 0.8}),
            Transform(
                name="CoarseDropout",
                args={"num_holes_range": [1, 4], "hole_height_range": [0.05, 0.2], "hole_width_range": [0.05, 0.2]},
            ),
        ],
        "the medium preset plus affine warps and cutout",
    )
)


def build_transform(transform: Transform, where: str) -> A.BasicTransform:
    info = transforms_registry().get(transform.name)
    try:
        with warnings.catch_warnings():
            # albumentations only warns about unknown arguments; a typo in a manifest deserves an error.
            warnings.filterwarnings("error", message=".*are not valid for transform", category=UserWarning)
            return info.cls(**transform.args)
    except (TypeError, ValueError, UserWarning) as exc:
        raise InvalidInput(f"{where}: {transform.name}({transform.args}) is invalid: {exc}") from exc


def augmentation_transforms(spec: AugmentationSpec, image_size: int) -> list[A.BasicTransform]:
    if spec.transforms is not None:
        return [build_transform(t, f"augmentation.transforms[{i}]") for i, t in enumerate(spec.transforms)]
    return [
        build_transform(t, f"augmentation.preset {spec.preset}")
        for t in PRESETS.get(spec.preset).transforms(image_size)
    ]


def _finish(image_size: int, mean: Sequence[float], std: Sequence[float]) -> list[Any]:
    return [
        A.Resize(image_size, image_size, mask_interpolation=cv2.INTER_NEAREST),
        A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0),
        ToTensorV2(),
    ]


def train_pipeline(spec: AugmentationSpec, image_size: int, mean: Sequence[float], std: Sequence[float]) -> A.Compose:
    return A.Compose([*augmentation_transforms(spec, image_size), *_finish(image_size, mean, std)])


def eval_pipeline(image_size: int, mean: Sequence[float], std: Sequence[float]) -> A.Compose:
    return A.Compose(_finish(image_size, mean, std))


# -- detection --

DETECTION_PRESETS: Registry[PresetInfo] = Registry("detection augmentation preset")
DETECTION_PRESETS.register(PresetInfo("none", lambda size: [], "no augmentation"))
DETECTION_PRESETS.register(PresetInfo("light", lambda size: [Transform(name="HorizontalFlip")], "horizontal flips"))
DETECTION_PRESETS.register(
    PresetInfo(
        "medium",
        lambda size: [
            Transform(name="HorizontalFlip"),
            Transform(name="Affine", args={"scale": [0.75, 1.25], "translate_percent": [-0.1, 0.1], "p": 0.5}),
            Transform(name="ColorJitter", args={"brightness": 0.2, "contrast": 0.2, "saturation": 0.2, "p": 0.5}),
        ],
        "flips, scaling and shifts (aspect kept), colour jitter",
    )
)
DETECTION_PRESETS.register(
    PresetInfo(
        "heavy",
        lambda size: [
            Transform(name="HorizontalFlip"),
            Transform(name="RandomSizedBBoxSafeCrop", args={"height": size, "width": size, "p": 0.5}),
            Transform(
                name="Affine",
                args={"scale": [0.5, 1.5], "translate_percent": [-0.15, 0.15], "rotate": [-10, 10], "p": 0.7},
            ),
            Transform(name="ColorJitter", args={"brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "p": 0.8}),
        ],
        "the medium preset, stronger, plus crops that keep every box and small rotations",
    )
)

# Boxes cut down to less than this fraction of themselves, or of less than this many pixels, are dropped
# while augmenting: what is left of them no longer shows the object.
MIN_VISIBILITY, MIN_AREA = 0.1, 1.0


def _moves_boxes(transform: A.BasicTransform) -> bool:
    """Whether ``transform`` leaves boxes valid: pixel-only transforms do not move them, and every other
    transform must say it moves bounding boxes (albumentations' 3D ones do not)."""
    targets = transform._targets if isinstance(transform._targets, tuple) else (transform._targets,)
    return isinstance(transform, A.ImageOnlyTransform) or Targets.BBOXES in targets


def detection_augmentation(spec: AugmentationSpec, image_size: int) -> list[A.BasicTransform]:
    if spec.transforms is None:
        return [
            build_transform(t, f"augmentation.preset {spec.preset}")
            for t in DETECTION_PRESETS.get(spec.preset).transforms(image_size)
        ]
    built = []
    for i, transform in enumerate(spec.transforms):
        where = f"augmentation.transforms[{i}]"
        candidate = build_transform(transform, where)
        if not _moves_boxes(candidate):
            raise InvalidInput(f"{where}: {transform.name} cannot move bounding boxes, so detection cannot use it")
        built.append(candidate)
    return built


def _detection_compose(transforms: list[Any], image_size: int, *, min_visibility: float, min_area: float) -> A.Compose:
    finish = [
        A.LongestMaxSize(max_size=image_size),
        A.PadIfNeeded(image_size, image_size, position="top_left", border_mode=cv2.BORDER_CONSTANT, fill=0),
        A.ToFloat(max_value=255.0),
        ToTensorV2(),
    ]
    boxes = A.BboxParams(
        format="pascal_voc", label_fields=["labels"], clip=True, min_visibility=min_visibility, min_area=min_area
    )
    return A.Compose([*transforms, *finish], bbox_params=boxes)


def detection_train_pipeline(spec: AugmentationSpec, image_size: int) -> A.Compose:
    transforms = detection_augmentation(spec, image_size)
    return _detection_compose(transforms, image_size, min_visibility=MIN_VISIBILITY, min_area=MIN_AREA)


def detection_eval_pipeline(image_size: int) -> A.Compose:
    """No box is dropped: evaluation sees every annotated box (their loss is logged against all of them)."""
    return _detection_compose([], image_size, min_visibility=0.0, min_area=0.0)
