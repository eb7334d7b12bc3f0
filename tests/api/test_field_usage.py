"""Every field the API accepts is read by something that acts on it: the API never accepts and ignores.

``READERS`` maps each spec field to the modules that act on it. The test fails when a field is missing from
the map (a new field nobody wired up), when a listed module does not read the field (an attribute access
``.snake_name``, or the ``camelName`` key where the operator reads the raw object), or when a field meant
for work that is not implemented yet is accepted instead of refused.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest
from pydantic import BaseModel
from pydantic.alias_generators import to_camel

from kiln.api.catalogue import load_catalogue
from kiln.api.export import ExportJobSpec
from kiln.api.parse import InvalidManifest, parse_manifest
from kiln.api.training import TrainingJobSpec
from tests.api.manifest_strategies import EXPORT_BASE, TRAINING_BASE

ROOT = Path(__file__).parents[2]

OPERATOR, RECONCILE, STATUS, RENDER, BACKGROUND = (
    "operator/changes.py",
    "operator/reconcile.py",
    "operator/status.py",
    "operator/render.py",
    "operator/background.py",
)
RESOLVE, LOCAL, PREFLIGHT = "kiln/api/resolve.py", "kiln/local.py", "kiln/preflight.py"
COMPONENTS, TRAINER, DATA, MODELS, AUGMENT, OPTIM = (
    "trainer/components.py",
    "trainer/trainer.py",
    "trainer/data.py",
    "trainer/models.py",
    "trainer/augment.py",
    "trainer/optim.py",
)
CHECKPOINT, CLASSIFICATION, CLASSIFICATION_DATA, SEGMENTATION = (
    "trainer/checkpoint.py",
    "trainer/tasks/classification.py",
    "trainer/tasks/classification_data.py",
    "trainer/tasks/segmentation.py",
)
S3 = "kiln/storage/s3.py"
SEGMENTATION_MODEL = "trainer/tasks/segmentation_model.py"
SEGMENTATION_DATA = "trainer/tasks/segmentation_data.py"
DETECTION, DETECTION_MODEL = "trainer/tasks/detection.py", "trainer/tasks/detection_model.py"
TRACKING, MLFLOW_LOG = "trainer/tracking.py", "trainer/mlflow_log.py"

# field (python names, dotted) -> the modules that act on it
READERS: dict[str, tuple[str, ...]] = {
    "task": (COMPONENTS, RESOLVE),
    "model": (CLASSIFICATION, SEGMENTATION),
    "model.architecture": (MODELS, SEGMENTATION_MODEL, DETECTION_MODEL),
    "model.encoder": (SEGMENTATION_MODEL,),
    "model.num_classes": (CLASSIFICATION, SEGMENTATION, DETECTION),
    "model.class_names": (DETECTION,),
    "model.pretrained": (MODELS, PREFLIGHT, SEGMENTATION_MODEL),
    "model.source": (MODELS, SEGMENTATION_MODEL),
    "model.args": (MODELS, SEGMENTATION_MODEL),
    "model.freeze_encoder": (SEGMENTATION_MODEL,),
    "model.freeze_encoder.epochs": (SEGMENTATION_MODEL,),
    "model.encoder_lr_scale": (SEGMENTATION_MODEL,),
    "model.freeze_backbone": (CLASSIFICATION,),
    "model.freeze_backbone.epochs": (CLASSIFICATION,),
    "model.backbone_lr_scale": (CLASSIFICATION,),
    "data": (COMPONENTS, DATA),
    "data.train": (COMPONENTS,),
    "data.train.uri": (DATA, PREFLIGHT),
    "data.train.format": (CLASSIFICATION, SEGMENTATION),
    "data.val": (COMPONENTS,),
    "data.val.uri": (DATA, PREFLIGHT),
    "data.val.format": (CLASSIFICATION, SEGMENTATION),
    "data.val_split": (CLASSIFICATION, SEGMENTATION),
    "data.test": (COMPONENTS,),
    "data.test.uri": (DATA, PREFLIGHT),
    "data.test.format": (CLASSIFICATION, SEGMENTATION),
    "data.image_size": (COMPONENTS, SEGMENTATION_MODEL),
    "data.ignore_index": (RESOLVE, SEGMENTATION),
    "data.palette": (SEGMENTATION_DATA,),
    "data.ignore_color": (SEGMENTATION_DATA,),
    "data.batch_size": (DATA,),
    "data.workers": (DATA,),
    "data.normalize": (COMPONENTS,),
    "data.normalize.mean": (COMPONENTS,),
    "data.normalize.std": (COMPONENTS,),
    "data.staging": (DATA,),
    "data.staging.mode": (DATA,),
    "data.staging.cache_dir": (DATA,),
    "data.staging.cache_claim": (RESOLVE, RENDER),
    "data.staging.parallelism": (DATA,),
    "augmentation": (COMPONENTS, CLASSIFICATION),
    "augmentation.preset": (AUGMENT,),
    "augmentation.transforms": (AUGMENT,),
    "augmentation.mixup": (CLASSIFICATION,),
    "augmentation.cutmix": (CLASSIFICATION,),
    "augmentation.label_smoothing": (CLASSIFICATION, SEGMENTATION),
    "optimizer": (COMPONENTS,),
    "optimizer.name": (OPTIM,),
    "optimizer.lr": (OPTIM,),
    "optimizer.weight_decay": (OPTIM,),
    "optimizer.momentum": (OPTIM,),
    "optimizer.betas": (OPTIM,),
    "scheduler": (COMPONENTS,),
    "scheduler.name": (OPTIM,),
    "scheduler.warmup_epochs": (COMPONENTS,),
    "scheduler.warmup_lr": (OPTIM,),
    "scheduler.min_lr": (OPTIM,),
    "scheduler.step_epochs": (OPTIM,),
    "scheduler.milestones": (OPTIM,),
    "scheduler.gamma": (OPTIM,),
    "scheduler.patience": (OPTIM,),
    "loss": (CLASSIFICATION, RESOLVE),
    "loss.name": (RESOLVE,),
    "loss.weights": (RESOLVE,),
    "loss.schedule": (RESOLVE,),
    "loss.class_weights": (CLASSIFICATION, SEGMENTATION),
    "epochs": (TRAINER, COMPONENTS, OPERATOR),
    "seed": (COMPONENTS, DATA),
    "precision": (COMPONENTS,),
    "channels_last": (COMPONENTS,),
    "compile": (COMPONENTS,),
    "grad_accumulation": (COMPONENTS,),
    "grad_clip": (COMPONENTS,),
    "ema": (COMPONENTS,),
    "ema.enabled": (COMPONENTS,),
    "ema.decay": (COMPONENTS,),
    "early_stopping": (COMPONENTS, RESOLVE),
    "early_stopping.patience": (COMPONENTS,),
    "early_stopping.min_delta": (COMPONENTS,),
    "early_stopping.metric": (RESOLVE,),
    "early_stopping.mode": (RESOLVE,),
    "validation": (RESOLVE, TRAINER),
    "validation.every": (TRAINER,),
    "validation.metric": (RESOLVE,),
    "validation.mode": (RESOLVE,),
    "checkpoint": (COMPONENTS, RESOLVE),
    "checkpoint.uri": (RESOLVE,),
    "checkpoint.every_epochs": (CHECKPOINT,),
    "checkpoint.every_steps": (CHECKPOINT,),
    "checkpoint.keep_last": (CHECKPOINT,),
    "checkpoint.keep_best": (CHECKPOINT,),
    "checkpoint.resume": (TRAINER, PREFLIGHT),
    "output": (RESOLVE,),
    "output.uri": (RESOLVE,),
    "tracking": (RESOLVE, TRACKING, RENDER),
    "tracking.mlflow": (TRACKING, RENDER),
    "tracking.mlflow.uri": (MLFLOW_LOG,),
    "tracking.mlflow.experiment": (MLFLOW_LOG,),
    "tracking.mlflow.run_name": (MLFLOW_LOG,),
    "tracking.mlflow.credentials_secret": (RENDER,),
    "resources": (RENDER, RESOLVE),
    "resources.nodes": (RESOLVE, STATUS),
    "resources.procs_per_node": (RESOLVE,),
    "resources.gpus_per_node": (RENDER, RESOLVE),
    "resources.find_unused_parameters": (COMPONENTS,),
    "resources.cpu": (RENDER,),
    "resources.memory": (RENDER,),
    "resources.node_selector": (RENDER,),
    "resources.tolerations": (RENDER,),
    "resources.affinity": (RENDER,),
    "image": (RESOLVE,),
    "storage": (RENDER, COMPONENTS),
    "storage.endpoint_url": (RENDER, RESOLVE, S3),
    "storage.region": (RENDER, S3),
    "storage.secret_ref": (RENDER, RESOLVE),
    "run_policy": (RENDER, RECONCILE),
    "run_policy.suspend": (STATUS,),
    "run_policy.max_restarts": (STATUS, LOCAL),
    "run_policy.retriable_exit_codes": (RECONCILE, LOCAL),
    "run_policy.active_deadline_seconds": (STATUS, LOCAL),
    "run_policy.ttl_seconds_after_finished": (BACKGROUND,),
    "run_policy.queue_name": (RENDER, STATUS),
    "run_policy.priority_class_name": (RENDER,),
    "run_policy.termination_grace_period_seconds": (RENDER, LOCAL),
}


def fields(model: type[BaseModel], prefix: str = "") -> Iterator[str]:
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        yield path
        for member in (field.annotation, *getattr(field.annotation, "__args__", ())):
            for candidate in (member, *getattr(member, "__args__", ())):
                if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                    yield from fields(candidate, f"{path}.")


@cache
def names_read(module: str) -> frozenset[str]:
    tree = ast.parse((ROOT / module).read_text())
    attributes = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    keys = {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)}
    return frozenset(attributes | keys)


def test_every_training_field_has_a_reader() -> None:
    accepted = set(fields(TrainingJobSpec))
    unmapped = accepted - READERS.keys()
    assert not unmapped, f"fields nothing is known to read: {sorted(unmapped)}"
    stale = READERS.keys() - accepted
    assert not stale, f"mapped fields that no longer exist: {sorted(stale)}"


@pytest.mark.parametrize(("field", "readers"), sorted(READERS.items()))
def test_each_reader_reads_its_field(field: str, readers: tuple[str, ...]) -> None:
    leaf = field.rsplit(".", 1)[-1]
    for module in readers:
        assert {leaf, to_camel(leaf)} & names_read(module), f"{module} does not read {field}"


def test_a_task_nothing_implements_is_refused_with_its_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    """A task in the schema that no trainer plugin implements (detection, in a catalogue without it) is refused,
    fields and all, rather than accepted and ignored."""
    catalogue = load_catalogue()
    tasks = {name: names for name, names in catalogue.tasks.items() if name != "detection"}
    monkeypatch.setattr("kiln.api.semantics.load_catalogue", lambda: dataclasses.replace(catalogue, tasks=tasks))
    document = copy.deepcopy(TRAINING_BASE)
    document["spec"].update({"task": "detection", "data": {"train": {"uri": "s3://bucket/x", "format": "coco"}}})
    with pytest.raises(InvalidManifest, match="detection is not implemented yet"):
        parse_manifest(document)


EXPORT_RENDER, EXPORT_STATUS, EXPORT_RESOLVE = (
    "operator/export_render.py",
    "operator/export_status.py",
    "kiln/api/export_resolve.py",
)
EXPORTER, EXPORT_FORMATS = "trainer/export/pipeline.py", "trainer/export/formats.py"

# ExportJob: the operator resolves the source and renders the pod; the exporter does the rest.
EXPORT_READERS: dict[str, tuple[str, ...]] = {
    "source": (EXPORT_STATUS, EXPORT_RESOLVE),
    "source.training_job": (EXPORT_STATUS,),
    "source.checkpoint": (EXPORT_STATUS,),
    "source.checkpoint_uri": (EXPORT_STATUS, EXPORTER),
    "formats": (EXPORTER,),
    "onnx": (EXPORTER,),
    "onnx.opset": (EXPORT_FORMATS,),
    "onnx.dynamic_batch": (EXPORT_FORMATS,),
    "onnx.dynamic_spatial": (EXPORT_FORMATS,),
    "input_shape": (EXPORTER,),
    "verify": (EXPORTER,),
    "verify.tolerance": (EXPORTER,),
    "verify.samples": (EXPORTER,),
    "benchmark": (EXPORTER,),
    "benchmark.batch_sizes": (EXPORTER,),
    "benchmark.iterations": (EXPORTER,),
    "quantize": (EXPORTER,),
    "quantize.mode": (EXPORTER,),
    "quantize.calibration_samples": (EXPORTER,),
    "quantize.max_metric_drop": (EXPORTER,),
    "quantize.min_speedup": (EXPORTER,),
    "output": (EXPORT_RESOLVE,),
    "output.uri": (EXPORT_RESOLVE, EXPORTER),
    "image": (EXPORT_RENDER,),
    "resources": (EXPORT_RENDER,),
    "resources.gpus": (EXPORT_RENDER,),
    "resources.cpu": (EXPORT_RENDER,),
    "resources.memory": (EXPORT_RENDER,),
    "resources.node_selector": (EXPORT_RENDER,),
    "resources.tolerations": (EXPORT_RENDER,),
    "storage": (EXPORT_RENDER, EXPORTER),
    "storage.endpoint_url": (RENDER,),  # export_render shares render.storage_env and secret_env_from
    "storage.region": (RENDER,),
    "storage.secret_ref": (RENDER,),
}


def test_every_export_field_has_a_reader() -> None:
    accepted = set(fields(ExportJobSpec))
    assert not accepted - EXPORT_READERS.keys(), (
        f"fields nothing is known to read: {sorted(accepted - EXPORT_READERS.keys())}"
    )
    assert not EXPORT_READERS.keys() - accepted, (
        f"mapped fields that no longer exist: {sorted(EXPORT_READERS.keys() - accepted)}"
    )
    parse_manifest(copy.deepcopy(EXPORT_BASE))  # and an ExportJob is accepted: a controller acts on it


@pytest.mark.parametrize(("field", "readers"), sorted(EXPORT_READERS.items()))
def test_each_export_reader_reads_its_field(field: str, readers: tuple[str, ...]) -> None:
    test_each_reader_reads_its_field(field, readers)
