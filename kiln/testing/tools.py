"""Where the tools that tools/install-*.sh put in place are found: the pinned cache first, then PATH.

A missing tool is an error, never a skipped test: ``make test`` installs every tool before pytest runs.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def tools_cache() -> Path:
    """The cache tools/install-*.sh write to (keep in step with tools/README.md)."""
    if explicit := os.environ.get("KILN_TOOLS_CACHE"):
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kiln" / "tools"


def tool_path(name: str) -> Path:
    """The binary ``name`` from the tools cache's bin/, else from PATH."""
    cached = tools_cache() / "bin" / name
    if cached.exists():
        return cached
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name}: not installed; run `make tools` (tools/install-*.sh)")
    return Path(found)
