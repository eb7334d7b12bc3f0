"""Rules a CRD schema cannot express: they need a lookup table, ordering, or knowledge of other libraries.

``kiln validate`` and the operator both run them after schema validation, so a manifest the apiserver accepts
can still be refused with a field path before any pod starts. Names the trainer resolves (the task itself,
data formats, architectures, encoders, optimizers, losses, metrics, albumentations transforms and their
arguments) are checked against the generated name catalogue (:mod:`kiln.api.catalogue`), one line per
problem with the closest valid names, so a typo fails here rather than in the pod.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from kiln.api.catalogue import TIMM_ENCODER_PREFIX, TaskNames, load_catalogue, unknown_name_message
from kiln.api.export import ExportJobSpec
from kiln.api.manifest import ExportJob, Manifest, ManifestError, TrainingJob
from kiln.api.model import KILN_MODEL_ARGS, SEGMENTATION_LOGITS_ONLY
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


def _model_args(spec: TrainingJobSpec) -> Iterator[Problem]:
    """model.args: never an argument Kiln passes itself; for an smp architecture, only what it takes."""
    model, catalogue = spec.model, load_catalogue()
    for key in sorted(model.args.keys() & KILN_MODEL_ARGS.keys()):
        yield f"model.args.{key}", f"set by {KILN_MODEL_ARGS[key]}; Kiln passes it to the constructor"
    detector = catalogue.detection_args.get(model.architecture) if spec.task == "detection" else None
    if detector is not None and model.source is None:  # an unknown architecture is _model's to report
        valid = detector.args - KILN_MODEL_ARGS.keys()
        for key in sorted(model.args.keys() - detector.args - KILN_MODEL_ARGS.keys()):
            yield f"model.args.{key}", unknown_name_message(f"{model.architecture} argument", key, valid)
    if spec.task != "segmentation" or _implemented(spec) is None:
        return
    yield from _aux_head(spec)
    takes = catalogue.segmentation_args.get(model.architecture.lower())
    # A plugin takes what its factory takes; an unknown architecture is _model's to report. smp hands what an
    # architecture does not take to the encoder, and only a tu- encoder (a timm model) uses it.
    if model.source is not None or takes is None or (model.encoder or "").startswith(TIMM_ENCODER_PREFIX):
        return
    valid = takes.args - KILN_MODEL_ARGS.keys()
    for key in sorted(model.args.keys() - takes.args - KILN_MODEL_ARGS.keys()):
        reason = unknown_name_message(f"{model.architecture} argument", key, valid)
        yield f"model.args.{key}", f"{reason} (only tu- encoders take more)"


def _aux_head(spec: TrainingJobSpec) -> Iterator[Problem]:
    """smp's classification head (model.args.aux_params) and the presence loss that trains it come together;
    Kiln's losses take logits, so neither the network nor the head may end in an activation."""
    aux, loss = spec.model.args.get("aux_params"), spec.loss
    if aux is not None and not isinstance(aux, dict):
        yield "model.args.aux_params", "must be an object of smp classification-head arguments"
        aux = {}
    for key, reason in SEGMENTATION_LOGITS_ONLY.items():
        for path, given in (("model.args", spec.model.args), ("model.args.aux_params", aux or {})):
            if key in given:
                yield f"{path}.{key}", reason
    if aux is not None and "classes" in aux:
        yield "model.args.aux_params.classes", "set by model.numClasses; Kiln passes it itself"
    named = set(loss.weights or ()) | ({loss.name} if loss.name else set())
    named |= set(loss.schedule[0].weights) if loss.schedule else set()
    if aux is not None and "presence" not in named:
        example = "for example {dice: 0.5, cross_entropy: 0.5, presence: 0.2}"
        reason = f"the classification head learns from the presence loss: add presence to loss.weights, {example}"
        yield "model.args.aux_params", reason
    if aux is None and "presence" in named:
        yield "loss", "presence trains smp's classification head: set model.args.aux_params"


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
    # The schema makes every keyframe name the same losses: the first one speaks for all.
    first = spec.loss.schedule[0].weights if spec.loss.schedule else {}
    named += [(f"loss.schedule[0].weights.{name}", name) for name in first]
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
    if spec.epochs == 0:  # nothing is trained, so no schedule runs (evaluation: the epochs field)
        return
    if scheduler.warmup_epochs >= spec.epochs:
        yield "scheduler.warmupEpochs", f"must be less than epochs ({spec.epochs})"
    if scheduler.name == "multistep" and scheduler.milestones != sorted(set(scheduler.milestones)):
        yield "scheduler.milestones", "must be strictly increasing"
    if scheduler.min_lr >= spec.optimizer.lr and scheduler.name == "cosine":
        yield "scheduler.minLr", f"must be below optimizer.lr ({spec.optimizer.lr})"
    for index, keyframe in enumerate(spec.loss.schedule or ()):
        if keyframe.epoch >= spec.epochs:  # a keyframe no epoch reaches would still bend the ones before it
            reason = f"must be less than epochs ({spec.epochs}): keyframes count from 0, so the last epoch is"
            yield f"loss.schedule[{index}].epoch", f"{reason} {spec.epochs - 1}"


def _checkpoints(spec: TrainingJobSpec) -> Iterator[Problem]:
    if spec.checkpoint.every_epochs == 0 and spec.checkpoint.every_steps == 0:
        yield "checkpoint.everyEpochs", "everyEpochs and everySteps are both 0: nothing would ever be saved"
    resume = spec.checkpoint.resume
    if resume not in ("auto", "never") and not resume.startswith(("s3://", "/", ".", "file://")):
        yield "checkpoint.resume", "must be auto, never, an s3:// URI or a file path"


def _classes(spec: TrainingJobSpec) -> Iterator[Problem]:
    weights = spec.loss.class_weights
    if isinstance(weights, list) and spec.model.num_classes is not None and len(weights) != spec.model.num_classes:
        yield "loss.classWeights", f"has {len(weights)} entries but model.numClasses is {spec.model.num_classes}"
    if spec.data.val is None and spec.data.val_split is None and spec.early_stopping is not None:
        yield "earlyStopping", "needs a validation split: set data.val or data.valSplit"


def _segmentation_losses(spec: TrainingJobSpec) -> Iterator[Problem]:
    """Loss options that segmentation would otherwise take and ignore."""
    if spec.task != "segmentation":
        return
    loss, binary = spec.loss, spec.model.num_classes == 1
    named = set(loss.weights or ()) | ({loss.name} if loss.name else set())  # empty: the default, dice + CE
    named |= set(loss.schedule[0].weights) if loss.schedule else set()
    if "bce" in named and not binary:
        yield "loss", "bce is binary cross-entropy: it needs model.numClasses 1 (use cross_entropy for more classes)"
    if loss.class_weights is not None:
        if binary:
            yield "loss.classWeights", "binary segmentation (numClasses 1) takes no class weights"
        elif "lovasz" in named:
            yield "loss.classWeights", "lovasz takes no class weights; weigh other losses or drop classWeights"
    if spec.augmentation.label_smoothing > 0 and named and not named & {"cross_entropy", "bce"}:
        yield "augmentation.labelSmoothing", "applies to the cross_entropy and bce losses; the loss has neither"


def _detection(spec: TrainingJobSpec) -> Iterator[Problem]:
    """Options detection would otherwise take and ignore: torchvision's detectors weigh their own classes."""
    if spec.task != "detection":
        return
    if spec.loss.class_weights is not None:
        yield "loss.classWeights", "detection trains with the detector's own losses, which take no class weights"
    if spec.augmentation.label_smoothing > 0:
        yield "augmentation.labelSmoothing", "detection trains with the detector's own losses, which take no smoothing"
    names, declared = spec.model.class_names, spec.model.num_classes
    if names is not None and declared is not None and len(names) != declared:
        yield "model.classNames", f"has {len(names)} names but model.numClasses is {declared}"
    if names is not None and len(set(names)) != len(names):
        repeated = sorted({name for name in names if names.count(name) > 1})
        yield "model.classNames", f"names a class twice: {', '.join(repeated)}"


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
    _model_args,
    _optimizer,
    _losses,
    _metrics,
    _schedule,
    _checkpoints,
    _classes,
    _segmentation_losses,
    _detection,
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
