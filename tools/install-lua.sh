#!/usr/bin/env bash
# Lua 5.1 from Debian: Argo CD runs resource health checks with gopher-lua, which has Lua 5.1 semantics, so the
# tests run helm/kiln/files/argocd-health.lua with the reference 5.1 interpreter. See tools/README.md.
set -euo pipefail
cache="${KILN_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kiln/tools}"
mkdir -p "$cache/bin"
if ! dpkg -s lua5.1 >/dev/null 2>&1; then
    apt-get update && apt-get install -y --no-install-recommends lua5.1
fi
ln -sfn /usr/bin/lua5.1 "$cache/bin/lua5.1"
