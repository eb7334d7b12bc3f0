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
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from overhead import LR, SEED, kiln_trainer, kiln_window, optimizer_steps, paired_windows, window_loader
from torch.utils.data import DataLoader

from kiln.trainer.demo import materialize
from kiln.trainer.models import build_model


def plain_window(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader[Any]) -> None:
    model.train()
    for batch in loader:  # no scheduler: Kiln's "none" schedule still steps its LambdaLR, which is overhead
        logits = model(batch["image"])
        loss = F.cross_entropy(logits, batch["target"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # The demo's own model and input size: what `make demo` actually trains.
    parser.add_argument("--model", default="resnet10t")
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 keeps windows steady)")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per window (a multiple of 10)")
    parser.add_argument("--pairs", type=int, default=30, help="Kiln/plain window pairs, warm-up included")
    parser.add_argument("--warmup", type=int, default=3, help="leading pairs not counted")
    args = parser.parse_args()
    os.environ.setdefault("KILN_METRICS_PORT", "0")
    # With both cores given to intra-op threads, every stray process stalls a window; one thread leaves the
    # other core for the rest of the machine and cuts the spread of paired ratios several times.
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        spec = {
            "task": "classification",
            "model": {"architecture": args.model},
            "data": {"train": {"uri": str(materialize() / "train")}, "imageSize": args.image_size},
        }
        trainer = kiln_trainer(spec, Path(tmp), batch_size=args.batch_size, steps=args.steps)
        torch.manual_seed(SEED)
        model = build_model(trainer.spec.model, trainer.c.data.num_classes)
        model.load_state_dict(trainer.c.model.state_dict())  # the same starting point
        optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
        plain_loader = window_loader(trainer.c.train_loader.dataset, args.batch_size, args.steps)
        stats = paired_windows(
            lambda: kiln_window(trainer), lambda: plain_window(model, optimizer, plain_loader),
            images=args.steps * args.batch_size, steps=args.steps, pairs=args.pairs, warmup=args.warmup,
        )  # fmt: skip
        # Same work, checked: as many optimizer steps on each side.
        plain_steps = optimizer_steps(optimizer)
        assert trainer.step == plain_steps == args.pairs * args.steps, (trainer.step, plain_steps)
    result = {"model": args.model, "image_size": args.image_size, "batch_size": args.batch_size,
              "steps_per_window": args.steps, **stats}  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()
