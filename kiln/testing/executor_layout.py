"""The executor's directory layout, shared with the harness that reads logs and cleans up.

    <root>/pods/<namespace>/<pod>/<container>.log   stdout+stderr of the container
    <root>/pods/<namespace>/<pod>/rootfs/...        mounted volumes, termination-log, workingDir
    <root>/volumes/pvc/<namespace>/<claim>/         PersistentVolumeClaims (shared by pods)
    <root>/process-groups/<pgid>                    one file per live pod process group

The process-group files let the harness kill pod processes even if the executor itself was
SIGKILLed before it could reap them.
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path


def pod_dir(root: Path, namespace: str, pod: str) -> Path:
    return root / "pods" / namespace / pod


def log_path(root: Path, namespace: str, pod: str, container: str) -> Path:
    return pod_dir(root, namespace, pod) / f"{container}.log"


def claim_dir(root: Path, namespace: str, claim: str) -> Path:
    return root / "volumes" / "pvc" / namespace / claim


def _groups_dir(root: Path) -> Path:
    return root / "process-groups"


def record_group(root: Path, pgid: int) -> None:
    _groups_dir(root).mkdir(parents=True, exist_ok=True)
    (_groups_dir(root) / str(pgid)).touch()


def forget_group(root: Path, pgid: int) -> None:
    (_groups_dir(root) / str(pgid)).unlink(missing_ok=True)


def kill_leftover_pod_groups(root: Path) -> None:
    """SIGKILL every pod process group the executor did not get to reap."""
    if not _groups_dir(root).is_dir():
        return
    for entry in _groups_dir(root).iterdir():
        with contextlib.suppress(ValueError, ProcessLookupError, PermissionError):
            os.killpg(int(entry.name), signal.SIGKILL)
        entry.unlink(missing_ok=True)
