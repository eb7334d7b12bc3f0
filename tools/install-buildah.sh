#!/usr/bin/env bash
# buildah (builds the Dockerfile's images without a daemon: --isolation chroot, vfs storage) and debootstrap
# (builds the local Debian base when no container registry is reachable), both from Debian. See tools/images.sh.
set -euo pipefail
cache="${KILN_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kiln/tools}"
mkdir -p "$cache/bin"
missing=()
for package in buildah debootstrap; do
    dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
done
if ((${#missing[@]})); then
    apt-get update && apt-get install -y --no-install-recommends "${missing[@]}"
fi
ln -sfn /usr/bin/buildah "$cache/bin/buildah"
ln -sfn /usr/sbin/debootstrap "$cache/bin/debootstrap"
