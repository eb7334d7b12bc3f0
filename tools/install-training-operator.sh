#!/usr/bin/env bash
# Kubeflow's training-operator v1 (the peer bench/operator_vs_kubeflow.py compares Kiln's operator with) and its
# PyTorchJob CRD, built from the Go module proxy; kiln/testing/training_operator.py runs it against the test
# control plane. See tools/README.md.
#
# `go install github.com/kubeflow/training-operator/cmd/training-operator.v1@VERSION` builds with the module's own
# go.mod pins (v1.8.1 has no replace directives). The CRD ships inside the module download
# (manifests/base/crds); it is copied next to the binary so the tests never need GOMODCACHE.
#
# Cached in <cache>/training-operator/<version>-<hash of this script>/{training-operator,crds/}, built under a
# lock, marked complete by a stamp, linked as <cache>/bin/training-operator. Warm: a stamp check. Cold: about
# 5 CPU-minutes of compiling (15 minutes wall on 2 cores that other work kept saturated; about 3 on idle ones).
set -euo pipefail

VERSION=v1.8.1
ATTEMPTS=4 # the module proxy occasionally drops a connection mid-download

cache="${KILN_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kiln/tools}"
log() { echo "[install-training-operator] $*" >&2; }

script_hash="$(sha256sum "${BASH_SOURCE[0]}" | cut -c1-12)"
target="$cache/training-operator/$VERSION-$script_hash"

link() {
    mkdir -p "$cache/bin"
    ln -sfn "$target/training-operator" "$cache/bin/training-operator"
    ln -sfn "$target/crds" "$cache/training-operator/crds"
}

mkdir -p "$cache/training-operator"
cd "$cache/training-operator" # outside any go.mod, so `go mod download` resolves the pinned module on its own
exec 9>"$cache/training-operator/.lock"
flock 9
if [[ -f "$target/.complete" && -x "$target/training-operator" ]]; then
    link
    log "up to date: $target/training-operator"
    exit 0
fi

go="$(command -v go || echo /usr/local/go/bin/go)"
if [[ ! -x "$go" ]]; then
    log "Go is not installed: need go >= 1.22 (training-operator $VERSION's go.mod) on PATH or at /usr/local/go/bin/go"
    exit 1
fi
# Never download a toolchain; a static binary, as upstream's image builds it (build/images/training-operator).
go_env=(GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-buildvcs=false GOWORK=off)

module=github.com/kubeflow/training-operator
staging="$target.partial"
rm -rf "$staging"
mkdir -p "$staging/crds"
log "building training-operator $VERSION into $target (cold: 3 to 15 minutes, as busy as the cores are)"
started=$SECONDS
for attempt in $(seq 1 "$ATTEMPTS"); do
    if env "${go_env[@]}" GOBIN="$staging" "$go" install -trimpath -ldflags "-s -w" \
        "$module/cmd/training-operator.v1@$VERSION"; then
        break
    fi
    if ((attempt == ATTEMPTS)); then
        log "go install $module/cmd/training-operator.v1@$VERSION failed $ATTEMPTS times"
        exit 1
    fi
    log "go install failed, retrying in $((5 * attempt))s ($attempt/$ATTEMPTS)"
    sleep $((5 * attempt))
done
mv "$staging/training-operator.v1" "$staging/training-operator"

# `go install` just downloaded the module, so this only reads the module cache.
module_dir="$(env "${go_env[@]}" "$go" mod download -json "$module@$VERSION" |
    sed -n 's/^\t"Dir": "\(.*\)",$/\1/p')"
crd="$module_dir/manifests/base/crds/kubeflow.org_pytorchjobs.yaml"
if [[ ! -f "$crd" ]]; then
    log "no PyTorchJob CRD at $crd: the module layout changed"
    exit 1
fi
cp "$crd" "$staging/crds/"
chmod -R u+w "$staging/crds" # the module cache is read-only; the copy need not be

rm -rf "$target"
mv "$staging" "$target"
echo "$VERSION" >"$target/.complete"
link
log "built in $((SECONDS - started))s: $cache/bin/training-operator"
