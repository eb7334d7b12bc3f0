"""Kiln's training-loop overhead: throughput of ``Trainer.train_epoch`` relative to a minimal PyTorch loop.

One process, one figure. Both loops train the same architecture (same init) on the same in-memory data (the
digits demo's training split, decoded and augmented once, so image decoding does not dilute the comparison)
with the same DataLoader (batch size, sampler, ``num_workers=0``), the same AdamW, fp32, and the same number
of optimizer steps per timed window. Nothing else runs inside Kiln's window: no validation, no checkpoint
(``everyEpochs`` is out of reach, ``everySteps`` is 0); what remains is Kiln's per-step bookkeeping (the
accumulation/AMP seam, the schedule, the all-reduced preemption flag, metrics and progress every 10 steps),
which is exactly the overhead being measured.

Method: short alternating windows of ``--steps`` optimizer steps each, in ABBA order (Kiln, plain, plain,
Kiln, ...) so that neither loop always runs second on a warmer cache, and each Kiln window is paired with the
plain window next to it. The first ``--warmup`` pairs are discarded. The figure is the median over pairs of
``kiln images/s / plain images/s`` (pairing cancels the machine's drift between pairs), with its IQR and
min/max; the 1-minute load average is sampled at every window, since other processes on a shared machine
move both numbers.

    .venv/bin/python bench/trainer_overhead.py [--model resnet10t] [--image-size 16] [--batch-size 32]
        [--threads 1] [--steps 40] [--pairs 30] [--warmup 3]

Prints one JSON line. Target: median ratio >= 0.97.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from overhead import SEED, add_window_arguments, kiln_against_plain, kiln_trainer, set_up_process

from kiln.trainer.demo import materialize
from kiln.trainer.models import build_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # The demo's own model and input size: what `make demo` actually trains.
    parser.add_argument("--model", default="resnet10t")
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=32)
    add_window_arguments(parser, steps=40, pairs=30, warmup=3)
    args = parser.parse_args()
    set_up_process(args)
    with tempfile.TemporaryDirectory() as tmp:
        spec = {
            "task": "classification",
            "model": {"architecture": args.model},
            "data": {"train": {"uri": str(materialize() / "train")}, "imageSize": args.image_size},
        }
        trainer = kiln_trainer(spec, Path(tmp), batch_size=args.batch_size, steps=args.steps)
        torch.manual_seed(SEED)
        model = build_model(trainer.spec.model, trainer.c.data.num_classes)
        stats = kiln_against_plain(
            trainer, model, lambda batch: F.cross_entropy(model(batch["image"]), batch["target"]), args
        )
    result = {"model": args.model, "image_size": args.image_size, "batch_size": args.batch_size,
              "steps_per_window": args.steps, **stats}  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()
