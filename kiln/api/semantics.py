"""Rules a CRD schema cannot express: they need a lookup table, ordering, or knowledge of other libraries.

``kiln validate`` and the operator both run them after schema validation, so a manifest the apiserver accepts
can still be refused with a field path before any pod starts. Names the trainer resolves (the task itself,
data formats, architectures, encoders, optimizers, losses, metrics, albumentations transforms and their
arguments) are checked against the generated name catalogue (:mod:`kiln.api.catalogue`), one line per
problem with the closest valid names, so a typo fails here rather than in the pod.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from kiln.api.catalogue import TaskNames, load_catalogue, unknown_name_message
from kiln.api.export import ExportJobSpec
from kiln.api.manifest import ExportJob, Manifest, ManifestError, TrainingJob
from kiln.api.training import TrainingJobSpec

Problem = tuple[str, str]  # (field path under spec, reason)


def _implemented(spec: TrainingJobSpec) -> TaskNames | None:
    """The task's names, or None while the trainer does not implement it (then only `_task` speaks)."""
    return load_catalogue().tasks.get(spec.task)


def _task(spec: TrainingJobSpec) -> Iterator[Problem]:
    if _implemented(spec) is None:
        implemented = ", ".join(sorted(load_catalogue().tasks))
        yield "task", f"{spec.task} is not implemented yet; implemented: {implemented}"


def _formats(spec: TrainingJobSpec) -> Iterator[Problem]:
    # The schema already refuses formats that do not fit the task; this refuses those not implemented yet.
    task = _implemented(spec)
    if task is None:
        return
    for split in ("train", "val", "test"):
        source = getattr(spec.data, split)
        if source is not None and source.format not in task.formats:
            reason = f"{source.format} is not implemented yet for {spec.task}; implemented: {', '.join(task.formats)}"
            yield f"data.{split}.format", reason


def _model(spec: TrainingJobSpec) -> Iterator[Problem]:
    if _implemented(spec) is None:
        return
    catalogue, model = load_catalogue(), spec.model
    # A plugin (model.source) builds whatever it likes; the architecture is then only a label.
    if model.source is None and not catalogue.architecture_known(spec.task, model.architecture):
        valid = catalogue.architectures[spec.task]
        yield "model.architecture", unknown_name_message(f"{spec.task} architecture", model.architecture, valid)
    if spec.task == "segmentation" and model.encoder is not None and not catalogue.encoder_known(model.encoder):
        kind = "segmentation encoder (an smp encoder, or tu-<timm model>)"
        yield "model.encoder", unknown_name_message(kind, model.encoder, catalogue.encoders)


def _optimizer(spec: TrainingJobSpec) -> Iterator[Problem]:
    optimizers, optimizer = load_catalogue().optimizers, spec.optimizer
    takes = optimizers.get(optimizer.name)
    if takes is None:
        yield "optimizer.name", unknown_name_message("optimizer", optimizer.name, optimizers)
        return
    # A hyperparameter the chosen optimizer has no use for would be accepted and ignored: refuse it.
    if optimizer.betas is not None and not takes.betas:
        yield "optimizer.betas", f"{optimizer.name} takes no betas; remove them or pick an Adam-family optimizer"
    if optimizer.momentum is not None and not takes.momentum:
        yield "optimizer.momentum", f"{optimizer.name} takes no momentum; remove it or pick sgd, rmsprop, ..."


def _losses(spec: TrainingJobSpec) -> Iterator[Problem]:
    task = _implemented(spec)
    if task is None:
        return
    named = [("loss.name", spec.loss.name)] if spec.loss.name is not None else []
    named += [(f"loss.weights.{name}", name) for name in spec.loss.weights or {}]
    for path, name in named:
        if name not in task.losses:
            yield path, unknown_name_message(f"{spec.task} loss", name, task.losses)


def _metrics(spec: TrainingJobSpec) -> Iterator[Problem]:
    task = _implemented(spec)
    if task is None:
        return
    watched = [("validation.metric", spec.validation.metric)]
    if spec.early_stopping is not None:
        watched.append(("earlyStopping.metric", spec.early_stopping.metric))
    for path, metric in watched:
        if metric is not None and metric.removeprefix("val/") not in task.metrics:
            yield path, unknown_name_message(f"{spec.task} metric", metric, task.metrics)


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


def _segmentation_losses(spec: TrainingJobSpec) -> Iterator[Problem]:
    """Loss options that segmentation would otherwise take and ignore."""
    if spec.task != "segmentation":
        return
    loss, binary = spec.loss, spec.model.num_classes == 1
    named = set(loss.weights or ()) | ({loss.name} if loss.name else set())  # empty: the default, dice + CE
    if "bce" in named and not binary:
        yield "loss", "bce is binary cross-entropy: it needs model.numClasses 1 (use cross_entropy for more classes)"
    if loss.class_weights is not None:
        if binary:
            yield "loss.classWeights", "binary segmentation (numClasses 1) takes no class weights"
        elif "lovasz" in named:
            yield "loss.classWeights", "lovasz takes no class weights; weigh other losses or drop classWeights"
    if spec.augmentation.label_smoothing > 0 and named and not named & {"cross_entropy", "bce"}:
        yield "augmentation.labelSmoothing", "applies to the cross_entropy and bce losses; the loss has neither"


def _transforms(spec: TrainingJobSpec) -> Iterator[Problem]:
    known = load_catalogue().transforms
    for index, transform in enumerate(spec.augmentation.transforms or ()):
        path = f"augmentation.transforms[{index}]"
        signature = known.get(transform.name)
        if signature is None:
            yield f"{path}.name", unknown_name_message("albumentations transform", transform.name, known)
            continue
        if signature.var_kwargs:
            continue
        for arg in sorted(set(transform.args) - signature.args):
            # The path stops at the transform: the argument may have been written inline or under args.
            yield path, unknown_name_message(f"{transform.name} argument", arg, signature.args)


TRAINING_CHECKS: tuple[Callable[[TrainingJobSpec], Iterator[Problem]], ...] = (
    _task,
    _formats,
    _model,
    _optimizer,
    _losses,
    _metrics,
    _schedule,
    _checkpoints,
    _classes,
    _segmentation_losses,
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
