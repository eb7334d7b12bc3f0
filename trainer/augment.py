"""Albumentations pipelines: presets and explicit transform lists, resolved by name through a registry.

Training applies the augmentation first, then resize and normalize; evaluation applies only the latter two.
Called with ``mask=`` (segmentation), the same geometric transforms move the mask; it is resized
nearest-neighbour, so it keeps only the class indices it had.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

import albumentations as A
import cv2
from albumentations.pytorch import ToTensorV2

from kiln.api.training import AugmentationSpec, Transform
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
