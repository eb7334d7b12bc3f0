#!/usr/bin/env bash
# Run every tools/install-*.sh (each idempotent and cached); see tools/README.md.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
for script in "$here"/install-*.sh; do
    [[ "$script" == "$here/install-all.sh" ]] && continue
    bash "$script"
done
