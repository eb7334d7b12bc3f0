"""Generates ``kiln/api/catalogue.json``: every name the trainer resolves, read off its registries and libraries.

Nothing here spells a name: tasks, formats, losses, metrics, flavors, optimizers, schedulers, presets and
transforms (and the torchvision detectors Kiln builds) come from the trainer's own registries, the rest from the
installed timm, segmentation-models-pytorch and albumentations. ``kiln crds`` writes the result and ``kiln crds
--check`` fails when the committed file differs, so the torch-free checks in ``kiln.api.semantics`` cannot
drift from what the trainer accepts.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from importlib.metadata import version
from typing import Any

import segmentation_models_pytorch as smp
import timm
from timm.optim import get_optimizer_info

from kiln.api.resolve import TASK_DEFAULTS
from kiln.trainer.augment import PRESETS, transforms_registry
from kiln.trainer.models import MODELS
from kiln.trainer.optim import OPTIMIZERS, SCHEDULERS
from kiln.trainer.tasks import TASKS
from kiln.trainer.tasks.detection_model import DETECTORS, accepted_args

# The libraries whose names the catalogue lists; their versions are recorded in it.
LIBRARIES = ("albumentations", "segmentation-models-pytorch", "timm", "torch", "torchvision")


def _classification() -> dict[str, Any]:
    from kiln.trainer.tasks.classification import LOSSES, ClassificationEvaluator
    from kiln.trainer.tasks.classification_data import FORMATS

    return {
        "formats": FORMATS.names(),
        "losses": LOSSES.names(),
        "metrics": sorted(ClassificationEvaluator.metric_names),
        "default_metric": TASK_DEFAULTS["classification"].metric,
    }


def _segmentation() -> dict[str, Any]:
    from kiln.trainer.tasks.segmentation import LOSSES, SegmentationEvaluator
    from kiln.trainer.tasks.segmentation_data import FORMATS

    return {
        "formats": FORMATS.names(),
        "losses": LOSSES.names(),
        # Per-class iou/<k> is reported too, but depends on numClasses: it cannot be a watched metric.
        "metrics": sorted(SegmentationEvaluator.METRICS),
        "default_metric": TASK_DEFAULTS["segmentation"].metric,
    }


def _detection() -> dict[str, Any]:
    from kiln.trainer.tasks.detection import FORMATS, LOSSES, DetectionEvaluator

    return {
        "formats": list(FORMATS),
        "losses": LOSSES.names(),
        # Per-class ap/<k> is not reported as a metric (evaluation.json has it): only these can be watched.
        "metrics": sorted(DetectionEvaluator.metric_names),
        "default_metric": TASK_DEFAULTS["detection"].metric,
    }


# Where each implemented task keeps its names. A task registered in TASKS without an entry here fails the
# generation, so a new task cannot ship without its names being checked.
TASK_NAMES: dict[str, Callable[[], dict[str, Any]]] = {
    "classification": _classification,
    "segmentation": _segmentation,
    "detection": _detection,
}


def _optimizer(name: str) -> dict[str, bool]:
    info = OPTIMIZERS.get(name)
    if info.cls is not None:  # one of Kiln's own four
        return {"momentum": info.has_momentum, "betas": info.has_betas}
    timm_info = get_optimizer_info(name)
    return {"momentum": timm_info.has_momentum, "betas": timm_info.has_betas}


def _constructor(cls: type) -> dict[str, Any]:
    parameters = inspect.signature(cls).parameters.values()  # __init__'s, without self
    return {
        "args": sorted(p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)),
        "var_kwargs": any(p.kind is p.VAR_KEYWORD for p in parameters),
    }


def _task(name: str) -> dict[str, Any]:
    if name not in TASK_NAMES:
        raise LookupError(f"task {name!r} is registered but kiln.trainer.catalogue.TASK_NAMES has no entry for it")
    return TASK_NAMES[name]()


def build_catalogue() -> dict[str, Any]:
    return {
        "tasks": {name: _task(name) for name in TASKS.names()},
        "architectures": {
            "classification": sorted({*MODELS.names(), *timm.list_models()}),
            "segmentation": sorted(smp.MODEL_ARCHITECTURES_MAPPING),
            "detection": DETECTORS.names(),
        },
        "kiln_flavors": MODELS.names(),
        "encoders": sorted(smp.encoders.get_encoder_names()),
        "optimizers": {name: _optimizer(name) for name in OPTIMIZERS.names()},
        "schedulers": SCHEDULERS.names(),
        "presets": PRESETS.names(),
        "transforms": {info.name: _constructor(info.cls) for info in transforms_registry()},
        "segmentation_args": {name: _constructor(cls) for name, cls in smp.MODEL_ARCHITECTURES_MAPPING.items()},
        "detection_args": {info.name: {"args": sorted(accepted_args(info)), "var_kwargs": False} for info in DETECTORS},
        # The local build label (+cu132, +cpu) does not change a name, so it is left out.
        "versions": {library: version(library).split("+", 1)[0] for library in LIBRARIES},
    }


def render_catalogue() -> str:
    """The catalogue as committed: sorted keys, one name per line, so regenerating it is deterministic."""
    return json.dumps(build_catalogue(), indent=1, sort_keys=True) + "\n"
