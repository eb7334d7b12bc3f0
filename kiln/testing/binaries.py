"""Where the control-plane binaries built by ``controlplane/build.py`` live."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")
BUILD_SCRIPT = Path(__file__).resolve().parents[2] / "controlplane" / "build.py"


class ControlPlaneUnavailable(RuntimeError):
    """The binaries are not built; the message says how to build them."""


def find_bin_dir() -> Path:
    """``$KILN_CONTROLPLANE_BIN`` if set, else the cache directory the build script reports."""
    if configured := os.environ.get("KILN_CONTROLPLANE_BIN"):
        bin_dir = Path(configured)
    elif BUILD_SCRIPT.exists():
        reported = subprocess.run(
            [sys.executable, str(BUILD_SCRIPT), "--print-bin-dir"],
            capture_output=True,
            text=True,
            check=True,
        )
        bin_dir = Path(reported.stdout.strip())
    else:
        raise ControlPlaneUnavailable("set KILN_CONTROLPLANE_BIN: no controlplane/build.py next to this package")
    missing = [name for name in COMPONENTS if not (bin_dir / name).is_file()]
    if missing:
        raise ControlPlaneUnavailable(
            f"control-plane binaries missing in {bin_dir}: {', '.join(missing)}. "
            f"Build them with `python3 {BUILD_SCRIPT}` (or `make test`, which does it first)."
        )
    return bin_dir
