"""TensorBoard event files for a run, under ``<output>/tensorboard/`` on any ``kiln.storage`` store.

The writer (torch's ``SummaryWriter``) writes into a local temporary folder; ``sync`` flushes it and uploads
every event file that grew, so an S3 output gets the curves as training goes, one epoch at a time. Every process
of a run writes its own event file into that same folder, which TensorBoard reads as one run: a restart appends
to it rather than starting a new run. A restart replays the steps after its checkpoint, so each process opens
its file with ``purge_step`` = its first step: TensorBoard then drops the older events from that step on, and
the curve shows each step once.

Methods run on the tracking worker thread (``kiln.trainer.tracking``), never on the training loop's.
"""

from __future__ import annotations

import io
import json
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from kiln.storage import Store

TENSORBOARD = "tensorboard"
HParam = int | float | str | bool


class TensorBoardLog:
    def __init__(self, store: Store, first_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only when a run starts logging

        self.store = store
        self.local = Path(tempfile.mkdtemp(prefix="kiln-tensorboard-"))
        # Flushing is ours (sync): no timer thread writing behind an upload.
        self.writer = SummaryWriter(str(self.local), purge_step=first_step, max_queue=10_000, flush_secs=10**6)
        self.uploaded: dict[str, int] = {}  # event file name -> size at its last upload

    def hparams(self, params: Mapping[str, HParam], metrics: list[str]) -> None:
        """The hyperparameters, into this run's own event file. ``SummaryWriter.add_hparams`` would open a new
        run (a subfolder) for them; the HParams dashboard reads ``metrics`` off this run's scalars instead."""
        from torch.utils.tensorboard.summary import hparams

        writer = self.writer._get_file_writer()
        for summary in hparams(dict(params), dict.fromkeys(metrics, 0.0)):
            writer.add_summary(summary)

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def image(self, tag: str, png: bytes, step: int) -> None:
        pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
        self.writer.add_image(tag, pixels, step, dataformats="HWC")

    def sync(self) -> None:
        self.writer.flush()
        for path in sorted(self.local.iterdir()):
            size = path.stat().st_size
            if self.uploaded.get(path.name) != size:
                self.store.upload_file(f"{TENSORBOARD}/{path.name}", path)
                self.uploaded[path.name] = size

    def close(self) -> None:
        self.writer.close()
        try:
            self.sync()
        finally:
            shutil.rmtree(self.local, ignore_errors=True)


def flat_hparams(tree: Mapping[str, Any], prefix: str = "") -> dict[str, HParam]:
    """A spec (camelCase JSON) as dotted keys with scalar values: ``optimizer.lr``, ``data.batchSize``; lists
    as their JSON text; unset (null) fields left out."""
    flat: dict[str, HParam] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flat_hparams(value, f"{name}."))
        elif isinstance(value, bool | int | float | str):
            flat[name] = value
        elif value is not None:
            flat[name] = json.dumps(value, separators=(",", ":"))
    return flat
