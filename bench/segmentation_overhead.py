"""Kiln's segmentation-step overhead: throughput of ``Trainer.train_epoch`` relative to a minimal smp loop.

One process, one figure. Both loops train the same smp network (``smp.create_model``, same init: the plain
model loads Kiln's state dict, strictly) on the same in-memory data (the synthetic shapes training split from
``kiln.trainer.shapes``, decoded and resized once) with the same loss (Kiln's segmentation default,
``0.5 * smp DiceLoss + 0.5 * cross-entropy``, ignore index 255), the same AdamW, fp32, ``num_workers=0`` and the
same number of optimizer steps per timed window (asserted at the end). Kiln's window is ``train_epoch()`` only:
no validation, no checkpoint. What it adds is its per-step bookkeeping: the accumulation/AMP seam, the schedule,
the preemption check, the per-term loss sums of a combined loss, and every 10 steps ``.item()``, Prometheus and
a ``/progress`` snapshot.

Method (shared with trainer_overhead.py, in overhead.py): ABBA-alternating windows of ``--steps`` optimizer
steps, each Kiln window paired with its plain neighbour, the first ``--warmup`` pairs discarded; the median of
the paired ``kiln images/s / plain images/s`` ratios, their IQR and min/max, and the 1-minute load average.

    .venv/bin/python bench/segmentation_overhead.py [--architecture unet] [--encoder resnet18]
        [--image-size 32] [--batch-size 16] [--threads 1] [--steps 10] [--pairs 16] [--warmup 2]

The defaults are smp's Unet with a resnet18 encoder and smp's default decoder, batch 16, at 32 px: the shapes
example's encoder (examples/shapes-segmentation.yaml narrows the decoder with model.args and trains at 64 px). The
smaller the step, the larger the share of Kiln's fixed per-step cost, and a run fits in a few minutes on a
shared 2-core VM. Prints one JSON line. Target: median ratio >= 0.97.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from overhead import SEED, Loss, add_window_arguments, kiln_against_plain, kiln_trainer, set_up_process
from torch import nn

from kiln.trainer.shapes import CLASSES, SPLITS, write_shapes

IGNORE_INDEX = 255  # Kiln's default data.ignoreIndex


def default_loss(model: nn.Module, dice: nn.Module) -> Loss:
    """Kiln's segmentation default, written out: 0.5 * dice + 0.5 * cross-entropy, ignoring IGNORE_INDEX."""

    def loss_of(batch: dict[str, Any]) -> torch.Tensor:
        logits = model(batch["image"])
        mask = batch["mask"]
        return 0.5 * dice(logits, mask) + 0.5 * F.cross_entropy(logits, mask, ignore_index=IGNORE_INDEX)

    return loss_of


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--architecture", default="unet")
    parser.add_argument("--encoder", default="resnet18")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    add_window_arguments(parser, steps=10, pairs=16, warmup=2)
    args = parser.parse_args()
    set_up_process(args)
    with tempfile.TemporaryDirectory() as tmp:
        shapes = write_shapes(Path(tmp) / "shapes", splits={"train": SPLITS["train"]}, size=args.image_size)
        spec = {
            "task": "segmentation",
            "model": {"architecture": args.architecture, "encoder": args.encoder, "numClasses": len(CLASSES)},
            "data": {"train": {"uri": str(shapes / "train"), "format": "segmentation-folder"},
                     "imageSize": args.image_size},
        }  # fmt: skip
        trainer = kiln_trainer(spec, Path(tmp) / "runs", batch_size=args.batch_size, steps=args.steps)
        assert trainer.job.loss_weights == {"dice": 0.5, "cross_entropy": 0.5}, trainer.job.loss_weights
        assert trainer.job.spec.data.ignore_index == IGNORE_INDEX, trainer.job.spec.data.ignore_index
        torch.manual_seed(SEED)
        model = smp.create_model(
            args.architecture, encoder_name=args.encoder, encoder_weights=None, classes=len(CLASSES)
        )
        dice = smp.losses.DiceLoss(smp.losses.MULTICLASS_MODE, ignore_index=IGNORE_INDEX)
        stats = kiln_against_plain(trainer, model, default_loss(model, dice), args)
    result = {"architecture": args.architecture, "encoder": args.encoder, "image_size": args.image_size,
              "batch_size": args.batch_size, "steps_per_window": args.steps, **stats}  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()
