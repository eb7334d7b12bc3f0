"""Helpers for the exporter tests: Kiln checkpoints written by the checkpoint module itself (no training run:
the exporter reads weights and the stored spec, not what training did), and resolved ExportJobs."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

from kiln.api.export import ExportJobSpec
from kiln.api.export_resolve import ResolvedExportJob, resolve_export
from kiln.api.resolve import ResolvedTrainingJob
from kiln.storage import open_store
from kiln.trainer.checkpoint import Checkpointer
from kiln.trainer.tasks import create_task
from kiln.trainer.tasks.base import TaskData
from tests.trainer.trainer_testkit import make_job, merge

# A segmentation network that exports in seconds: smp's unet on resnet18, three stages deep, slim decoder.
SEG_MODEL = {
    "architecture": "unet", "encoder": "resnet18", "numClasses": 4,
    "args": {"encoder_depth": 3, "decoder_channels": [16, 8, 8]},
}  # fmt: skip
FAST = {"benchmark": {"batchSizes": [1, 4], "iterations": 5}}


def classification_job(root: Path, dataset: Path, /, **overrides: Any) -> ResolvedTrainingJob:
    return make_job(root, dataset, name="clf", **overrides)


def segmentation_job(root: Path, data: Path) -> ResolvedTrainingJob:
    folder = {"format": "segmentation-folder"}
    spec = {"task": "segmentation", "model": SEG_MODEL, "data": {"train": folder, "val": folder, "imageSize": 32}}
    return make_job(root, data, name="seg", **spec)


def save_checkpoint(job: ResolvedTrainingJob, class_names: tuple[str, ...], *, ema: bool = True) -> str:
    """A checkpoint as the trainer writes it. The EMA weights differ from the model's (scaled), so a test can
    tell which ones were exported."""
    torch.manual_seed(0)
    network = create_task(job.spec.task).build_model(job, TaskData(splits={}, num_classes=len(class_names)))
    model = network.state_dict()
    averaged = {k: v * 0.5 if v.is_floating_point() and k.endswith("weight") else v for k, v in model.items()}
    state = {
        "format": 1, "model": model, "ema": averaged if ema else None, "epoch": 2, "step": 12,
        "metrics": {"val/accuracy": 0.75, "val/loss": 0.5}, "class_names": list(class_names),
        "spec": job.model_dump(mode="json", by_alias=True),
    }  # fmt: skip
    checkpointer = Checkpointer(job.spec.checkpoint, open_store(job.checkpoint_uri), mode="max")
    uri = checkpointer.save(state, epoch=2, step=12, score=0.75)
    assert uri is not None
    return uri


def export_job(checkpoint: str, output: Path, name: str = "exp", **spec: Any) -> ResolvedExportJob:
    document = merge({"source": {"checkpointUri": checkpoint}, "output": {"uri": str(output)}}, merge(FAST, spec))
    return resolve_export(name, "local", ExportJobSpec.model_validate(document))


def write_export_spec(job: ResolvedExportJob, path: Path) -> Path:
    path.write_text(job.model_dump_json(by_alias=True))
    return path


def exporter_command(spec: Path) -> list[str]:
    return [sys.executable, "-m", "kiln.trainer.export", "--spec", str(spec)]


def read_report(output: Path) -> dict[str, Any]:
    return json.loads((output / "export-report.json").read_text())  # type: ignore[no-any-return]
