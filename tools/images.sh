#!/usr/bin/env bash
# Build and run Kiln's container images with buildah: no daemon (--isolation chroot), vfs storage in a store of
# its own, so nothing here touches a system container store. `make images` and tests/images/ call this.
#
#   tools/images.sh base                    build (once) and cache the local Debian base image
#   tools/images.sh build operator|trainer  build a Dockerfile target; prints the image name
#   tools/images.sh run operator|trainer CMD...  run CMD in a throwaway container of that image
#   tools/images.sh inspect operator|trainer  the image's configuration (JSON)
#   tools/images.sh size operator|trainer   the image's size
#   tools/images.sh rm operator|trainer     remove the image, then prune
#   tools/images.sh prune                   remove the images no tag holds (intermediate layers of old builds)
#   tools/images.sh name operator|trainer   the image's name
#
# BASE_IMAGE: the Dockerfile's base. "local" (the default here) builds it with debootstrap from Debian packages,
# for machines that reach no container registry; docker.io/library/python:3.11-slim is the Dockerfile's own
# default for everyone else. KILN_IMAGES_STORE: where the store lives (default ~/.cache/kiln/images).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
store="${KILN_IMAGES_STORE:-${XDG_CACHE_HOME:-$HOME/.cache}/kiln/images}"
base_image="${BASE_IMAGE:-local}"
uv_cache="${UV_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/uv}"
host_ca_bundle="${KILN_BUILD_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"

# The local base mirrors python:3.11-slim: Debian bookworm, CPython 3.11, CA certificates, tzdata.
suite=bookworm
mirror="${KILN_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
packages=python3,python3-venv,ca-certificates,netbase,tzdata
local_base="localhost/kiln-base:$suite-python3.11"
recipe="$(printf '%s\n' "$suite" "$mirror" "$packages" | sha256sum | cut -c1-16)"

bah() { buildah --root "$store/root" --runroot "$store/run" --storage-driver vfs "$@"; }

# Image names: the trainer's is the operator's default (kiln.api.contract), the operator's sits beside it.
trainer_default="$(sed -n 's/^DEFAULT_TRAINER_IMAGE = "\(.*\)"$/\1/p' "$repo/kiln/api/contract.py")"
image_name() {
    case "$1" in
        trainer) echo "${KILN_TRAINER_IMAGE:-$trainer_default}" ;;
        operator) echo "${KILN_OPERATOR_IMAGE:-${trainer_default/kiln-trainer/kiln-operator}}" ;;
        *) echo "images.sh: target must be operator or trainer, got '$1'" >&2; exit 2 ;;
    esac
}

build_local_base() {
    if [[ "$(bah inspect --type image --format '{{index .ImageAnnotations "dev.kiln.base-recipe"}}' \
        "$local_base" 2>/dev/null)" == "$recipe" ]]; then
        return 0
    fi
    mkdir -p "$store"
    local rootfs
    rootfs="$(mktemp -d "$store/rootfs.XXXXXX")"
    # A RETURN trap outlives the function that set it: it clears itself, or it would fire again when the caller
    # returns, with $rootfs out of scope (set -u ends the script there).
    trap 'rm -rf "$rootfs"; trap - RETURN' RETURN
    debootstrap --variant=minbase --include="$packages" "$suite" "$rootfs" "$mirror" >"$store/debootstrap.log" 2>&1 \
        || { tail -20 "$store/debootstrap.log" >&2; echo "images.sh: debootstrap failed (log: $store/debootstrap.log)" >&2; return 1; }
    # What an image does not need: package lists and caches, docs, and /dev (the runtime provides it).
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/* "$rootfs"/usr/share/doc/* \
        "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* "$rootfs"/var/log/* "$rootfs"/dev/*
    local ctr mnt
    ctr="$(bah from scratch)"
    mnt="$(bah mount "$ctr")"
    cp -a "$rootfs"/. "$mnt"/
    bah umount "$ctr" >/dev/null
    bah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --env LANG=C.UTF-8 \
        --cmd python3 --annotation "dev.kiln.base-recipe=$recipe" \
        --label "org.opencontainers.image.description=Debian $suite ($packages) by debootstrap, for Kiln's images" \
        "$ctr"
    bah commit --rm --quiet "$ctr" "$local_base" >/dev/null
}

build() {
    local target="$1" base="$base_image" name
    name="$(image_name "$target")"
    if [[ "$base" == local ]]; then
        build_local_base
        base="$local_base"
    fi
    mkdir -p "$uv_cache"
    # The host's CA bundle stands in for the base's during RUN steps only (a bind mount is never committed), so
    # a machine behind a TLS-intercepting proxy can reach PyPI while the images keep Debian's bundle.
    local trust=()
    [[ -f "$host_ca_bundle" ]] && trust=(--volume "$host_ca_bundle:/etc/ssl/certs/ca-certificates.crt:ro")
    # The host's uv cache is lent to the RUN steps (UV_CACHE_DIR), so wheels the tests already downloaded are
    # not fetched again; the Dockerfile's own cache mount serves BuildKit users.
    bah build --isolation chroot --layers --force-rm --quiet --target "$target" \
        --build-arg "BASE_IMAGE=$base" \
        --build-arg "VERSION=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$repo/pyproject.toml" | head -1)" \
        --build-arg "REVISION=$(git -C "$repo" rev-parse HEAD 2>/dev/null || echo unknown)" \
        --build-arg UV_CACHE_DIR=/uv-cache --volume "$uv_cache:/uv-cache" "${trust[@]}" \
        --tag "$name" --file "$repo/Dockerfile" "$repo" >/dev/null
    # Every changed layer is a whole copy of its image under vfs: past the limit, drop what no tag holds (the next
    # build then misses the layer cache once).
    if (($(du -sm "$store/root" | cut -f1) > ${KILN_IMAGES_STORE_MAX_MB:-6000})); then
        prune
    fi
    echo "$name"
}

prune() { bah rmi --prune >/dev/null 2>&1 || true; }

run_in() {
    local target="$1" ctr status=0
    shift
    ctr="$(bah from --quiet "$(image_name "$target")")"
    bah run --isolation chroot "$ctr" -- "$@" || status=$?
    bah rm "$ctr" >/dev/null
    return "$status"
}

command="${1:-}"
shift || true
case "$command" in
    base) build_local_base; echo "$local_base" ;;
    build) build "$@" ;;
    run) run_in "$@" ;;
    inspect) bah inspect --type image "$(image_name "$1")" ;;
    size) bah images --noheading --format '{{.Size}}' "$(image_name "$1")" ;;
    rm) bah rmi --force "$(image_name "$1")" >/dev/null; prune ;;
    prune) prune ;;
    name) image_name "$1" ;;
    *) echo "usage: tools/images.sh base|build|run|inspect|size|rm|prune|name [operator|trainer] [CMD...]" >&2; exit 2 ;;
esac
