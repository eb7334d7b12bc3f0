"""What verification, calibration and the quantized models' metric run on: the source job's validation images
when they are reachable from here, random inputs otherwise; the report says which (``verificationInputs``).

Validation images go through the trainer's own evaluation pipeline (resize, the run's normalization), so the
exported graph sees exactly what the network saw at validation time. The split is read as the trainer reads
it: ``data.val``, or the ``data.valSplit`` hold-out of ``data.train`` (whose layout also fixes the class
order). For S3 data that means staging the splits into the node cache, as the trainer does.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from kiln.api.resolve import ResolvedTrainingJob
from kiln.api.status import VerificationInputs
from kiln.storage import StorageError
from kiln.trainer.data import localize
from kiln.trainer.distributed import World
from kiln.trainer.errors import InvalidInput
from kiln.trainer.export.source import Source
from kiln.trainer.models import data_config
from kiln.trainer.tasks import create_task
from kiln.trainer.tasks.base import Batch, SplitData

log = logging.getLogger(__name__)

Shape = tuple[int, int, int]  # channels, height, width


def normalization(source: Source) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean and std the run normalized with: a detector's own transform's (data.normalize or its default), else
    data.normalize, else the network's own (timm's pretrained_cfg), the rule the trainer applies."""
    transform = getattr(source.network, "transform", None)
    if isinstance(transform, GeneralizedRCNNTransform):
        return tuple(transform.image_mean), tuple(transform.image_std)
    given = source.job.spec.data.normalize
    if given is not None:
        return tuple(given.mean), tuple(given.std)
    config = data_config(source.network)
    return tuple(config["mean"]), tuple(config["std"])


@dataclass
class InputSource:
    kind: VerificationInputs
    note: str
    shape: Shape
    dataset: Dataset[Batch] | None = None
    size: int = 0
    seed: int = 0

    def batches(self, count: int, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """``count`` inputs (and targets, for validation images) in batches; validation images are spread evenly
        over the split, so every class tends to be represented."""
        if self.dataset is None:
            generator = torch.Generator().manual_seed(self.seed)
            for start in range(0, count, batch_size):
                size = min(batch_size, count - start)
                yield torch.randn((size, *self.shape), generator=generator), None
            return
        indices = _spread(self.size, count)
        for start in range(0, len(indices), batch_size):
            items = [self.dataset[i] for i in indices[start : start + batch_size]]
            key = next((k for k in ("target", "mask") if k in items[0]), None)
            targets = torch.stack([item[key] for item in items]) if key is not None else None
            yield torch.stack([item["image"] for item in items]).float(), targets

    def take(self, count: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        parts = list(self.batches(count, 32))
        images = torch.cat([images for images, _ in parts])
        targets = [targets for _, targets in parts]
        return images, (torch.cat(targets) if all(t is not None for t in targets) else None)  # type: ignore[arg-type]

    def available(self, wanted: int) -> int:
        return wanted if self.dataset is None else min(wanted, self.size)


def _spread(size: int, count: int) -> Sequence[int]:
    if count >= size:
        return range(size)
    return [round(i * (size - 1) / max(count - 1, 1)) for i in range(count)]


def _validation_split(job: ResolvedTrainingJob) -> SplitData:
    data = job.spec.data
    sources = {"train": data.train, "val": data.val}
    world = World(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    roots: dict[str, Path] = {
        split: localize(source, split, job, world) for split, source in sources.items() if source is not None
    }
    splits = create_task(job.spec.task).load_data(job, roots).splits
    if "val" not in splits:
        raise InvalidInput("the source job has no validation split (data.val or data.valSplit)")
    return splits["val"]


def input_source(source: Source, shape: Shape, seed: int = 0) -> InputSource:
    """Validation images when the source job's data is reachable and fits ``shape``, else random inputs."""
    job = source.job
    channels, height, width = shape
    if channels != 3 or height != width:
        reason = f"input shape {list(shape)} is not a square RGB image"
        return InputSource("random", f"random inputs: {reason}", shape, seed=seed)
    try:
        split = _validation_split(job)
        mean, std = normalization(source)
        dataset, size = split.dataset(source.task.input_pipeline(height, mean, std)), len(split)
    except (InvalidInput, StorageError, OSError) as exc:
        log.warning("verifying on random inputs: the source job's validation data is not usable here: %s", exc)
        return InputSource("random", f"random inputs: validation data unusable: {exc}", shape, seed=seed)
    if size == 0:
        return InputSource("random", "random inputs: the validation split is empty", shape, seed=seed)
    log.info("verifying on the source job's validation images (%d available)", size)
    return InputSource("validation", f"{size} validation images", shape, dataset=dataset, size=size, seed=seed)
