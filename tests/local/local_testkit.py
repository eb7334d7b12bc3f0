"""Helpers for the ``kiln run`` tests: manifests on tiny data, the CLI as a subprocess, its process tree."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

COLORS = ((220, 40, 40), (40, 200, 60), (50, 60, 220))


def write_images(root: Path, per_class: int, *, size: int = 16, seed: int = 0) -> Path:
    """An imagefolder split of 3 classes, each a noisy patch of one colour: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    for label, color in enumerate(COLORS):
        folder = root / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            pixels = np.clip(np.array(color) + rng.integers(-40, 40, size=(size, size, 3)), 0, 255)
            Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{index:03d}.png")
    return root


def write_manifest(path: Path, name: str, data: Path | None, /, **spec: Any) -> Path:
    """A TrainingJob on ``data``'s train/val splits (debug model, 16 px, 1 process); ``spec`` overrides."""
    base: dict[str, Any] = {
        "task": "classification",
        "model": {"architecture": "debug"},
        "data": {"imageSize": 16, "batchSize": 8, "workers": 0},
        "epochs": 2,
        "resources": {"procsPerNode": 1},
    }
    if data is not None:
        base["data"] |= {"train": {"uri": str(data / "train")}, "val": {"uri": str(data / "val")}}
    for key, value in spec.items():
        base[key] = base[key] | value if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    manifest = {"apiVersion": "kiln.dev/v1alpha1", "kind": "TrainingJob", "metadata": {"name": name}, "spec": base}
    path.write_text(json.dumps(manifest))
    return path


def cli_env() -> dict[str, str]:
    return {**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"}


def kiln_run_command(manifest: Path) -> list[str]:
    return [sys.executable, "-m", "kiln.cli", "run", str(manifest)]


def descendants(root: int) -> list[int]:
    """Every process below ``root`` (Linux /proc)."""
    parent = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent[int(entry.name)] = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        children = [child for child, ppid in parent.items() if ppid == pid]
        found.extend(children)
        todo.extend(children)
    return found


def global_rank0(root: int) -> int | None:
    """The pid of the training process with RANK=0 below ``root`` (torchrun sets RANK only in workers)."""
    for pid in descendants(root):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"RANK=0" in environ and b"LOCAL_RANK=0" in environ:
            return pid
    return None


def kill_everything(process: subprocess.Popen[str]) -> None:
    """SIGKILL a kiln run and all it started (torchrun puts each worker in a session of its own)."""
    for pid in [*descendants(process.pid), process.pid]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    process.wait()
