"""``make demo`` against timm's own ``train.py`` doing the same job, end to end, 2 processes under torchrun.

Kiln's side is exactly what ``make demo`` runs: ``python -m kiln.trainer.demo`` (``kiln run`` on
``examples/digits.yaml``), timed from the process start to its exit. timm's side is its reference script under
``python -m torch.distributed.run --standalone --nproc-per-node 2``, with flags derived from the same manifest:
resnet10t from random init with 10 classes at 16 px, batch 32 per process, AdamW (lr, weight decay), a
per-step cosine schedule with the same warm-up epochs, the same epochs and label smoothing, no loader workers,
fp32 on CPU (through a small shim: timm's DDP call passes CPU ``device_ids``, which torch rejects), a
checkpoint every epoch (as Kiln's ``everyEpochs: 1``) and validation every epoch. Augmentation is
the nearest timm offers to the manifest's mild affine: a random-resized crop of 80-100 % at aspect 0.9-1.1, no
flip, no colour jitter. Both read the demo's digits folders (``kiln.trainer.demo.materialize``), written
before the first round and outside every timed window.

timm's ``train.py`` is not in the timm wheel and is not vendored here (1,500 lines): pass its path. It is
timm's repository file at the tag of the version in uv.lock, for example::

    git -C pytorch-image-models show v1.0.31:train.py > /tmp/timm_train.py

Rounds alternate which side goes first (ABBA) so neither always runs on a warmer page cache or a quieter
minute. Per run: wall seconds, CPU seconds of the whole process tree (user + sys, from the children's rusage:
the steadier figure on a shared machine, as it leaves out the time spent descheduled), the best validation
accuracy, and the 1-minute load average before it. Kiln's run also gets a timeline: every output line stamped on
arrival, reduced to phases (start-up to the first trainer line, each epoch, checkpoint saves, the final
evaluation, tracking's pictures, the teardown).

    .venv/bin/python bench/demo_vs_timm.py --timm-train /tmp/timm_train.py [--rounds 3] [--epochs N]

Prints one JSON object (``--out FILE`` also writes it). ``--epochs`` overrides both sides' epochs for a quick
check; the comparison in docs/benchmarks.md uses the manifest's.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ROOT / "examples" / "digits.yaml"
RUN = ROOT / ".kiln" / "local" / "digits"  # kiln.trainer.demo's run folder (its RUN)
# Trainer log lines: "2026-11-30 13:49:57,979 [rank 0] INFO kiln.trainer.trainer: epoch 3 validation: ..."
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d [\d:,]+ \[rank (\d+)\] \w+ ([\w.]+): (.*)$")
SAVED = re.compile(r"saved checkpoint .* in ([\d.]+)s")
# timm's train.py hands DDP ``device_ids=[device]`` even on CPU, which torch rejects for CPU modules ("device_ids
# ... only work with ... GPU modules"); this shim drops device_ids for CPU devices, then runs train.py as
# __main__. It imports torch first, which train.py does anyway, so it adds nothing measurable.
TIMM_CPU_SHIM = """\
import runpy, sys
import torch
from torch.nn.parallel import DistributedDataParallel

_init = DistributedDataParallel.__init__

def _init_cpu(self, module, device_ids=None, *args, **kwargs):
    if device_ids and all(torch.device(d).type == "cpu" for d in device_ids):
        device_ids = None
    _init(self, module, device_ids, *args, **kwargs)

DistributedDataParallel.__init__ = _init_cpu
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def timm_command(
    shim: Path, train_py: Path, *, data: Path, out: Path, spec: dict[str, Any], procs: int, epochs: int
) -> list[str]:
    """timm's flags for the manifest's job (see the module docstring for what is matched and how)."""
    size, batch = spec["data"]["imageSize"], spec["data"]["batchSize"]
    optimizer, scheduler = spec["optimizer"], spec["scheduler"]
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs),
        str(shim), str(train_py),
        "--data-dir", str(data), "--train-split", "train", "--val-split", "val",
        "--model", spec["model"]["architecture"], "--num-classes", str(spec["model"]["numClasses"]),
        "--input-size", "3", str(size), str(size), "--crop-pct", "1.0",
        "-b", str(batch), "-j", str(spec["data"]["workers"]),
        "--opt", optimizer["name"], "--lr", str(optimizer["lr"]), "--weight-decay", str(optimizer["weightDecay"]),
        "--sched", scheduler["name"], "--sched-on-updates", "--warmup-epochs", str(scheduler["warmupEpochs"]),
        "--cooldown-epochs", "0", "--epochs", str(epochs), "--smoothing", str(spec["augmentation"]["labelSmoothing"]),
        "--scale", "0.8", "1.0", "--ratio", "0.9", "1.1", "--hflip", "0", "--color-jitter", "0",
        "--device", "cpu", "--no-prefetcher", "--checkpoint-hist", str(spec["checkpoint"]["keepLast"]),
        "--seed", "0", "--log-interval", "50", "--output", str(out), "--experiment", "timm",
    ]  # fmt: skip


Stamped = list[tuple[float, str]]  # (seconds since the start, an output line)


def timed(command: list[str], env: dict[str, str], cwd: Path, log: Path) -> tuple[float, float, Stamped]:
    """(wall seconds, CPU seconds of the process tree, output lines stamped with their arrival time)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    lines: Stamped = []
    with subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as proc:
        assert proc.stdout is not None
        for raw in proc.stdout:
            lines.append((time.monotonic() - started, raw.decode(errors="replace").rstrip()))
        code = proc.wait()
    wall = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    log.write_text("\n".join(f"{at:8.2f} {line}" for at, line in lines) + "\n")
    if code not in (0, 1):  # the demo exits 1 when it misses its own 180 s target: still a measurement
        raise SystemExit(f"{command[:4]} exited {code}; its output is in {log}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, lines


def kiln_timeline(lines: Stamped, wall: float) -> dict[str, float]:
    """Seconds per phase of a Kiln run, from its stamped output (arrival times, not the log's own clock)."""
    marks: dict[str, float] = {}
    epochs: list[float] = []
    saves: list[float] = []
    for at, line in lines:
        if line.startswith("kiln run "):
            marks.setdefault("header", at)
        match = LOG_LINE.match(line)
        if not match:
            continue
        marks.setdefault("first_trainer_line", at)
        message = match.group(3)
        if " validation: " in message and message.startswith("epoch "):
            epochs.append(at)
        elif saved := SAVED.search(message):
            saves.append(float(saved.group(1)))
        elif "on the best checkpoint" in message:
            marks["best_evaluated"] = at
        elif message.startswith("training ") or " completed at epoch " in message:
            marks["completed"] = at
    phases = {"parent_start_s": marks.get("header", 0.0)}
    if "first_trainer_line" in marks:
        phases["launch_to_first_trainer_line_s"] = marks["first_trainer_line"] - phases["parent_start_s"]
    if epochs and "first_trainer_line" in marks:
        phases["first_line_to_epoch1_validated_s"] = epochs[0] - marks["first_trainer_line"]
        gaps = [b - a for a, b in itertools.pairwise(epochs)]
        phases["later_epoch_median_s"] = statistics.median(gaps) if gaps else 0.0
    phases["checkpoint_saves_total_s"] = sum(saves)
    phases["checkpoint_save_median_s"] = statistics.median(saves) if saves else 0.0
    if epochs and "best_evaluated" in marks:
        phases["last_epoch_to_best_evaluated_s"] = marks["best_evaluated"] - epochs[-1]
    if "best_evaluated" in marks and "completed" in marks:
        phases["best_evaluated_to_completed_s"] = marks["completed"] - marks["best_evaluated"]
    if "completed" in marks:
        phases["completed_to_exit_s"] = wall - marks["completed"]
    return {key: round(value, 2) for key, value in phases.items()}


def kiln_accuracy() -> float | None:
    try:
        return float(json.loads((RUN / "summary.json").read_text())["evaluation"]["metrics"]["accuracy"])
    except (OSError, KeyError, ValueError, TypeError):
        return None


def timm_accuracy(out: Path) -> float | None:
    try:
        with (out / "timm" / "summary.csv").open() as f:
            return max(float(row["eval_top1"]) for row in csv.DictReader(f)) / 100.0
    except (OSError, KeyError, ValueError):
        return None


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


def summarize(values: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values), 2), "min": round(min(values), 2), "max": round(max(values), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timm-train", type=Path, required=True, help="timm's train.py (not in the wheel)")
    parser.add_argument("--rounds", type=int, default=3, help="Kiln/timm pairs, alternating which goes first")
    parser.add_argument("--epochs", type=int, default=None, help="override both sides' epochs (a quick check)")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON result here")
    args = parser.parse_args()
    if not args.timm_train.is_file():
        raise SystemExit(f"--timm-train {args.timm_train}: no such file")
    from kiln.trainer.demo import materialize

    data = materialize()
    spec = yaml.safe_load(MANIFEST.read_text())["spec"]
    epochs = args.epochs or spec["epochs"]
    procs = spec["resources"]["procsPerNode"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    work = Path(tempfile.mkdtemp(prefix="kiln-demo-vs-timm-"))
    shim = work / "timm_cpu_shim.py"
    shim.write_text(TIMM_CPU_SHIM)
    kiln_cmd = [sys.executable, "-m", "kiln.trainer.demo"]
    if args.epochs is not None:  # the demo runs examples/digits.yaml as is: a copy with other epochs
        manifest = yaml.safe_load(MANIFEST.read_text())
        manifest["spec"]["epochs"] = epochs
        (work / "digits.yaml").write_text(yaml.safe_dump(manifest))
        kiln_cmd += ["--manifest", str(work / "digits.yaml")]
    runs: dict[str, list[dict[str, Any]]] = {"kiln": [], "timm": []}
    for number in range(args.rounds):
        order = ("kiln", "timm") if number % 2 == 0 else ("timm", "kiln")
        for side in order:
            load = load_average()
            if side == "kiln":
                wall, cpu, lines = timed(kiln_cmd, env, ROOT, work / f"kiln-{number}.log")
                extra: dict[str, Any] = {"accuracy": kiln_accuracy(), "timeline": kiln_timeline(lines, wall)}
            else:
                out = work / f"timm-{number}"
                command = timm_command(
                    shim, args.timm_train.absolute(), data=data, out=out, spec=spec, procs=procs, epochs=epochs
                )
                wall, cpu, _ = timed(command, env, work, work / f"timm-{number}.log")
                extra = {"accuracy": timm_accuracy(out)}
                shutil.rmtree(out, ignore_errors=True)  # its checkpoints: ~60 MB each
            runs[side].append({"round": number, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "load": load,
                               **extra})  # fmt: skip
            print(json.dumps({"side": side, **runs[side][-1]}), file=sys.stderr, flush=True)
    kiln_wall = [r["wall_s"] for r in runs["kiln"]]
    timm_wall = [r["wall_s"] for r in runs["timm"]]
    kiln_cpu = [r["cpu_s"] for r in runs["kiln"]]
    timm_cpu = [r["cpu_s"] for r in runs["timm"]]
    result = {
        "rounds": args.rounds,
        "epochs": epochs,
        "kiln_wall_s": summarize(kiln_wall),
        "timm_wall_s": summarize(timm_wall),
        "ratio_wall_kiln_over_timm": round(statistics.median(kiln_wall) / statistics.median(timm_wall), 3),
        # Each round's own ratio: the two runs of a round saw nearly the same machine.
        "ratio_wall_per_round": [round(k / t, 3) for k, t in zip(kiln_wall, timm_wall, strict=True)],
        "kiln_cpu_s": summarize(kiln_cpu),
        "timm_cpu_s": summarize(timm_cpu),
        "ratio_cpu_kiln_over_timm": round(statistics.median(kiln_cpu) / statistics.median(timm_cpu), 3),
        "runs": runs,
        "logs": str(work),
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
