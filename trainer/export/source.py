"""The source checkpoint: found, read, hashed, and turned back into the network it was saved from.

A checkpoint URI may name a ``state.pt``, a checkpoint folder holding one (``step-000001234/``), or a
checkpoint root (``.../checkpoints``), where ``best.json`` or ``latest.json`` picks the folder as
source.checkpoint says. The network is rebuilt from the ResolvedTrainingJob every Kiln checkpoint stores,
with its weights: the EMA copy when the run kept one (that is what the run validated and picked its best
checkpoint by), else the model's, with DDP (``module.``) and torch.compile (``_orig_mod.``) prefixes removed.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import ValidationError
from torch import nn

from kiln.api.resolve import ResolvedTrainingJob
from kiln.api.runtime import StorageSpec
from kiln.api.status import ExportedWeights
from kiln.storage import ObjectNotFoundError, StorageError, Store, open_store
from kiln.trainer.errors import InvalidInput
from kiln.trainer.export.failures import InvalidSource, SourceNotFound, SourceUnreadable
from kiln.trainer.export.tasks import EXPORT_TASKS, ExportTaskInfo
from kiln.trainer.models import classifier_paths
from kiln.trainer.tasks import TASKS, create_task
from kiln.trainer.tasks.base import TaskData

log = logging.getLogger(__name__)

STATE, POINTERS = "state.pt", {"best": "best.json", "latest": "latest.json"}
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


@dataclass(frozen=True)
class Source:
    uri: str
    """The state.pt that was read."""
    sha256: str
    job: ResolvedTrainingJob
    task: ExportTaskInfo
    network: nn.Module
    """The rebuilt network with the exported weights, in eval mode, on the CPU."""
    weights: ExportedWeights
    class_names: tuple[str, ...]
    metrics: dict[str, float]
    epoch: int
    step: int


def _local_path(uri: str) -> Path | None:
    return None if uri.startswith("s3://") else Path(uri.removeprefix("file://"))


def _pointed_folder(store: Store, which: Literal["best", "latest"], uri: str) -> str:
    """The checkpoint folder a checkpoint root's best.json (or latest.json) names; best falls back to latest
    when no checkpoint was scored."""
    for name in (which, "latest") if which == "best" else ("latest",):
        if store.exists(POINTERS[name]):
            pointer = json.loads(store.read_bytes(POINTERS[name]))
            return str(pointer["name"] if name == "best" else pointer["latest"])
    raise SourceNotFound(f"{uri}: no {STATE}, best.json or latest.json: not a Kiln checkpoint or checkpoint folder")


def locate(uri: str, storage: StorageSpec | None, which: Literal["best", "latest"] = "best") -> tuple[Store, str]:
    """(store, key) of the state.pt that ``uri`` names."""
    local = _local_path(uri)
    if local is not None and not local.exists():  # open_store would create a missing folder
        raise SourceNotFound(f"checkpoint {uri} does not exist")
    try:
        if uri.endswith(".pt") and (local is None or local.is_file()):
            parent, _, key = uri.rpartition("/")
            return open_store(parent or ".", storage), key
        store = open_store(uri.rstrip("/"), storage)
        if store.exists(STATE):
            return store, STATE
        return store, f"{_pointed_folder(store, which, uri)}/{STATE}"
    except ObjectNotFoundError as exc:  # storage errors name the URI themselves
        raise SourceNotFound(f"no checkpoint: {exc}") from exc
    except StorageError as exc:
        raise SourceUnreadable(f"cannot read the checkpoint: {exc}") from exc
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidSource(f"checkpoint {uri}: unreadable pointer file: {exc}") from exc


def read_checkpoint(uri: str, storage: StorageSpec | None, which: Literal["best", "latest"]) -> tuple[str, bytes]:
    store, key = locate(uri, storage, which)
    try:
        return store.url(key), store.read_bytes(key)
    except ObjectNotFoundError as exc:
        raise SourceNotFound(f"no checkpoint: {exc}") from exc
    except StorageError as exc:
        raise SourceUnreadable(f"cannot read the checkpoint: {exc}") from exc


def _unpickle(url: str, data: bytes) -> dict[str, Any]:
    try:
        # Kiln's own checkpoints hold RNG states next to tensors, so they are full pickles (as on resume).
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    except Exception as exc:  # a truncated or foreign pickle raises nearly anything
        raise InvalidSource(f"{url} is not a loadable checkpoint: {type(exc).__name__}: {exc}") from exc
    if (
        not isinstance(state, dict)
        or not isinstance(state.get("model"), dict)
        or not isinstance(state.get("spec"), dict)
    ):
        raise InvalidSource(f"{url} is not a Kiln checkpoint: it holds no model weights and training spec")
    return state


def strip_wrappers(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in weights.items():
        name = key
        while name.startswith(WRAPPER_PREFIXES):
            name = name.split(".", 1)[1]
        out[name] = value
    return out


def buildable(job: ResolvedTrainingJob) -> ResolvedTrainingJob:
    """The job without model.pretrained: the checkpoint's weights replace those anyway, so the pretrained URI
    is never fetched (by the exporter, or by an evaluation)."""
    model = job.spec.model.model_copy(update={"pretrained": None})
    return job.model_copy(update={"spec": job.spec.model_copy(update={"model": model})})


def _class_count(job: ResolvedTrainingJob, names: tuple[str, ...], weights: dict[str, torch.Tensor]) -> int:
    if names:
        return len(names)
    if job.spec.model.num_classes is not None:
        return job.spec.model.num_classes
    # A checkpoint from before class names were saved, of a classifier whose class count came from its data:
    # the head's weight says how many rows it has.
    probe = create_task(job.spec.task).build_model(job, TaskData(splits={}, num_classes=1))
    for head in classifier_paths(probe):
        if f"{head}.weight" in weights:
            return int(weights[f"{head}.weight"].shape[0])
    raise InvalidSource("the checkpoint records no class names, model.numClasses or classifier head to count them")


def rebuild(
    job: ResolvedTrainingJob, weights: dict[str, torch.Tensor], class_names: tuple[str, ...]
) -> tuple[nn.Module, int]:
    """The network in eval mode with ``weights`` loaded (strictly), and its number of classes."""
    job = buildable(job)
    try:
        classes = _class_count(job, class_names, weights)
        network = create_task(job.spec.task).build_model(job, TaskData(splits={}, num_classes=classes))
        network.load_state_dict(weights)
    except (InvalidInput, RuntimeError) as exc:
        raise InvalidSource(f"cannot rebuild {job.spec.model.architecture} from the checkpoint: {exc}") from exc
    return network.eval(), classes


def load_source(uri: str, storage: StorageSpec | None, which: Literal["best", "latest"] = "best") -> Source:
    url, data = read_checkpoint(uri, storage, which)
    state = _unpickle(url, data)
    try:
        job = ResolvedTrainingJob.model_validate(state["spec"])
    except ValidationError as exc:
        raise InvalidSource(f"{url}: its training spec is not one this Kiln reads: {exc.errors()[0]['msg']}") from exc
    task = job.spec.task
    if task not in EXPORT_TASKS:
        known = "the trainer has no such task" if task not in TASKS else "the exporter does not handle it yet"
        raise InvalidSource(f"{url} is a {task} checkpoint: {known} (exportable: {', '.join(EXPORT_TASKS.names())})")
    use_ema = isinstance(state.get("ema"), dict)
    weights = strip_wrappers(state["ema"] if use_ema else state["model"])
    names = tuple(str(name) for name in state.get("class_names") or ())
    network, count = rebuild(job, weights, names)
    classes = names or _default_names(job, count)
    log.info("loaded %s (%s weights, task %s, %d classes)", url, "ema" if use_ema else "model", task, len(classes))
    return Source(
        uri=url,
        sha256=hashlib.sha256(data).hexdigest(),
        job=job,
        task=EXPORT_TASKS.get(task),
        network=network,
        weights="ema" if use_ema else "model",
        class_names=classes,
        metrics={str(k): float(v) for k, v in (state.get("metrics") or {}).items()},
        epoch=int(state.get("epoch", 0)),
        step=int(state.get("step", 0)),
    )


def _default_names(job: ResolvedTrainingJob, count: int) -> tuple[str, ...]:
    """Class names for checkpoints that predate them: the segmentation task's own, or class indices."""
    if job.spec.task == "segmentation" and count == 1:
        return ("background", "foreground")
    return tuple(str(k) for k in range(count))
