#!/usr/bin/env bash
# Build (or reuse) the pinned control-plane binaries; prints their directory last. See build.py.
set -euo pipefail
exec python3 "$(dirname "${BASH_SOURCE[0]}")/build.py" "$@"
