"""Rules a CRD schema cannot express: they need a lookup table, ordering, or knowledge of other libraries.

``kiln validate`` and the operator both run them after schema validation, so a manifest the apiserver accepts
can still be refused with a field path before any pod starts.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterator

from kiln.api.export import ExportJobSpec
from kiln.api.manifest import ExportJob, Manifest, ManifestError, TrainingJob
from kiln.api.training import TrainingJobSpec

# Validation metrics each task computes (val/<name>); the trainer's task plugins produce exactly these.
METRICS_BY_TASK: dict[str, tuple[str, ...]] = {
    "classification": ("accuracy", "top5", "precision", "recall", "f1", "loss"),
    "segmentation": ("miou", "dice", "pixel_accuracy", "loss"),
    "detection": ("map", "map50", "map75", "loss"),
}

Problem = tuple[str, str]  # (field path under spec, reason)


def _metrics(spec: TrainingJobSpec) -> Iterator[Problem]:
    known = METRICS_BY_TASK[spec.task]
    watched = [("validation.metric", spec.validation.metric)]
    if spec.early_stopping is not None:
        watched.append(("earlyStopping.metric", spec.early_stopping.metric))
    for path, metric in watched:
        if metric is not None and metric.removeprefix("val/") not in known:
            yield path, f"unknown {spec.task} metric {metric!r}; known: {', '.join(known)}"


def _schedule(spec: TrainingJobSpec) -> Iterator[Problem]:
    scheduler = spec.scheduler
    if scheduler.warmup_epochs >= spec.epochs:
        yield "scheduler.warmupEpochs", f"must be less than epochs ({spec.epochs})"
    if scheduler.name == "multistep" and scheduler.milestones != sorted(set(scheduler.milestones)):
        yield "scheduler.milestones", "must be strictly increasing"
    if scheduler.min_lr >= spec.optimizer.lr and scheduler.name == "cosine":
        yield "scheduler.minLr", f"must be below optimizer.lr ({spec.optimizer.lr})"


def _checkpoints(spec: TrainingJobSpec) -> Iterator[Problem]:
    if spec.checkpoint.every_epochs == 0 and spec.checkpoint.every_steps == 0:
        yield "checkpoint.everyEpochs", "everyEpochs and everySteps are both 0: nothing would ever be saved"
    resume = spec.checkpoint.resume
    if resume not in ("auto", "never") and not resume.startswith(("s3://", "/", ".", "file://")):
        yield "checkpoint.resume", "must be auto, never, an s3:// URI or a file path"


def _classes(spec: TrainingJobSpec) -> Iterator[Problem]:
    weights = spec.loss.class_weights
    if weights is not None and spec.model.num_classes is not None and len(weights) != spec.model.num_classes:
        yield "loss.classWeights", f"has {len(weights)} entries but model.numClasses is {spec.model.num_classes}"
    if spec.data.val is None and spec.data.val_split is None and spec.early_stopping is not None:
        yield "earlyStopping", "needs a validation split: set data.val or data.valSplit"


def _transforms(spec: TrainingJobSpec) -> Iterator[Problem]:
    # Only checked where albumentations is installed (the trainer image, dev installs); the trainer's
    # registry repeats the check at start-up either way.
    if not spec.augmentation.transforms or importlib.util.find_spec("albumentations") is None:
        return
    import albumentations

    for index, transform in enumerate(spec.augmentation.transforms):
        candidate = getattr(albumentations, transform.name, None)
        if not (isinstance(candidate, type) and issubclass(candidate, albumentations.BasicTransform)):
            yield f"augmentation.transforms[{index}].name", f"unknown albumentations transform {transform.name!r}"


TRAINING_CHECKS: tuple[Callable[[TrainingJobSpec], Iterator[Problem]], ...] = (
    _metrics,
    _schedule,
    _checkpoints,
    _classes,
    _transforms,
)


def _export_checks(spec: ExportJobSpec) -> Iterator[Problem]:
    if spec.onnx.dynamic_spatial and "onnx" not in spec.formats:
        yield "onnx.dynamicSpatial", "applies to ONNX: add onnx to formats"


def semantic_errors(manifest: Manifest, source: str = "") -> list[ManifestError]:
    problems: list[Problem] = []
    if isinstance(manifest, TrainingJob):
        for check in TRAINING_CHECKS:
            problems.extend(check(manifest.spec))
    elif isinstance(manifest, ExportJob):
        problems.extend(_export_checks(manifest.spec))
    return [ManifestError(source, f"spec.{path}", reason) for path, reason in problems]
