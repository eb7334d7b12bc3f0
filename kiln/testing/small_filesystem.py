"""A real, small filesystem for disk-full tests: a tmpfs of a fixed size, mounted for the test and then unmounted.

A full tmpfs answers a write with ENOSPC exactly as a full disk or a full PersistentVolume does, so the code under
test meets the real error from the real kernel; nothing is patched. Mounting needs root (CAP_SYS_ADMIN): elsewhere
the test is skipped with the reason, since no unprivileged way gives a filesystem of a chosen size.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def small_filesystem(path: Path, size_bytes: int) -> Iterator[Path]:
    """Mount a tmpfs of ``size_bytes`` at ``path`` (created if missing), owned by this user; unmount on exit."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs for the disk-full test needs root")
    options = f"size={size_bytes},mode=0755,uid={os.getuid()},gid={os.getgid()}"
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "kiln-test-tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        # Lazy: a process the test started may still hold a file open; the mount goes once it lets go.
        subprocess.run(["umount", "--lazy", str(path)], check=True)
