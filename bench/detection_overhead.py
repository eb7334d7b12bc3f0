"""Kiln's detection-step overhead: throughput of ``Trainer.train_epoch`` relative to a minimal torchvision loop.

One process, one figure. Both loops train the same torchvision detector (built by its torchvision builder with
``weights=None, weights_backbone=None``, classes + background, the transform sized to the image; the plain model
loads Kiln's state dict, strictly) on the same in-memory data (the synthetic detection shapes' training split
from ``kiln.trainer.detection_shapes``, decoded and resized once, batches of lists as torchvision takes them),
with the same summed loss dict, the same AdamW, fp32, ``num_workers=0`` and the same number of optimizer steps
per timed window (asserted at the end). The plain loop is the shape of torchvision's detection reference
(``references/detection/engine.py: train_one_epoch``): images and targets to the device, ``loss_dict =
model(images, targets)``, ``sum(loss_dict.values())``, zero_grad, backward, step. Kiln's window is
``train_epoch()`` only: no validation, no checkpoint. What it adds is its per-step bookkeeping: the
accumulation/AMP seam, the schedule, the preemption check, the per-term loss sums, and every 10 steps
``.item()``, Prometheus and a ``/progress`` snapshot.

Method (shared with trainer_overhead.py and segmentation_overhead.py, in overhead.py): ABBA-alternating windows
of ``--steps`` optimizer steps, each Kiln window paired with its plain neighbour, the first ``--warmup`` pairs
discarded; the median of the paired ``kiln images/s / plain images/s`` ratios, their IQR and min/max, and the
1-minute load average.

    .venv/bin/python bench/detection_overhead.py [--architecture fasterrcnn_mobilenet_v3_large_320_fpn]
        [--image-size 64] [--batch-size 8] [--threads 1] [--steps 10] [--pairs 12] [--warmup 2]

The defaults are the shapes-detection example's network and image size (examples/shapes-detection.yaml). The
smaller the step, the larger the share of Kiln's fixed per-step cost. Prints one JSON line. Target: median
ratio >= 0.97.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from overhead import SEED, Loss, add_window_arguments, kiln_against_plain, kiln_trainer, set_up_process
from torch import nn

from kiln.trainer.detection_shapes import CLASSES, SPLITS, write_detection_shapes
from kiln.trainer.tasks.detection_data import detection_collate
from kiln.trainer.tasks.detection_model import DETECTORS


def summed_losses(model: nn.Module) -> Loss:
    """torchvision's reference step: ``loss_dict = model(images, targets)``, ``sum(loss_dict.values())``."""

    def loss_of(batch: dict[str, Any]) -> torch.Tensor:
        images = list(batch["image"])
        targets = [{"boxes": b, "labels": k + 1} for b, k in zip(batch["boxes"], batch["labels"], strict=True)]
        loss_dict = model(images, targets)
        return sum(loss_dict.values())  # type: ignore[return-value]

    return loss_of


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--architecture", default="fasterrcnn_mobilenet_v3_large_320_fpn")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    add_window_arguments(parser, steps=10, pairs=12, warmup=2)
    args = parser.parse_args()
    set_up_process(args)
    with tempfile.TemporaryDirectory() as tmp:
        shapes = write_detection_shapes(
            Path(tmp) / "shapes", splits={"train": SPLITS["train"]}, size=args.image_size, formats=("coco",)
        )
        spec = {
            "task": "detection",
            "model": {"architecture": args.architecture},
            "data": {"train": {"uri": str(shapes / "coco" / "train"), "format": "coco"}, "imageSize": args.image_size},
        }
        trainer = kiln_trainer(
            spec, Path(tmp) / "runs", batch_size=args.batch_size, steps=args.steps, collate=detection_collate
        )
        assert trainer.job.loss_weights == {"model": 1.0}, trainer.job.loss_weights
        torch.manual_seed(SEED)
        info = DETECTORS.get(args.architecture)
        sized = {"min_size": args.image_size, "max_size": args.image_size} if info.sized else {}
        model = info.build(weights=None, weights_backbone=None, num_classes=len(CLASSES) + 1, **sized)
        stats = kiln_against_plain(trainer, model, summed_losses(model), args, detection_collate)
    result = {"architecture": args.architecture, "image_size": args.image_size, "batch_size": args.batch_size,
              "steps_per_window": args.steps, **stats}  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()
