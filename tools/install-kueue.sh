#!/usr/bin/env bash
# Kueue's manager and CRDs, built from the Go module proxy; the Kueue tests run it against the test control
# plane (kiln/testing/kueue.py, docs/operations.md "Kueue"). See tools/README.md.
#
# `go install sigs.k8s.io/kueue/cmd/kueue@VERSION` builds with Kueue's own go.mod pins (it has no replace
# directives). The version ldflag is upstream's (Kueue's Makefile), so the manager's "Initializing" log line
# names the release. The CRDs ship inside the module download (config/components/crd/bases); they are copied
# next to the binary so the tests never need GOMODCACHE.
#
# Cached in <cache>/kueue/<version>-<hash of this script>/{kueue,crds/}, built under a lock, marked complete by
# a stamp, linked as <cache>/bin/kueue. Warm: a stamp check. Cold: about 5 minutes on 2 idle cores.
set -euo pipefail

KUEUE_VERSION=v0.17.0
ATTEMPTS=4 # the module proxy occasionally drops a connection mid-download

cache="${KILN_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kiln/tools}"
log() { echo "[install-kueue] $*" >&2; }

script_hash="$(sha256sum "${BASH_SOURCE[0]}" | cut -c1-12)"
target="$cache/kueue/$KUEUE_VERSION-$script_hash"

link() {
    mkdir -p "$cache/bin"
    ln -sfn "$target/kueue" "$cache/bin/kueue"
    ln -sfn "$target/crds" "$cache/kueue/crds"
}

mkdir -p "$cache/kueue"
cd "$cache/kueue" # outside any go.mod, so `go mod download` resolves the pinned module on its own
exec 9>"$cache/kueue/.lock"
flock 9
if [[ -f "$target/.complete" && -x "$target/kueue" ]]; then
    link
    log "up to date: $target/kueue"
    exit 0
fi

go="$(command -v go || echo /usr/local/go/bin/go)"
if [[ ! -x "$go" ]]; then
    log "Go is not installed: need go >= 1.25 (kueue $KUEUE_VERSION's go.mod) on PATH or at /usr/local/go/bin/go"
    exit 1
fi
# Never download a toolchain; a static binary, like upstream's release builds.
go_env=(GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-buildvcs=false GOWORK=off)

pkg=sigs.k8s.io/kueue
staging="$target.partial"
rm -rf "$staging"
mkdir -p "$staging/crds"
log "building kueue $KUEUE_VERSION into $target (cold: about 5 minutes)"
started=$SECONDS
for attempt in $(seq 1 "$ATTEMPTS"); do
    if env "${go_env[@]}" GOBIN="$staging" "$go" install -trimpath \
        -ldflags "-s -w -X $pkg/pkg/version.GitVersion=$KUEUE_VERSION" "$pkg/cmd/kueue@$KUEUE_VERSION"; then
        break
    fi
    if ((attempt == ATTEMPTS)); then
        log "go install $pkg/cmd/kueue@$KUEUE_VERSION failed $ATTEMPTS times"
        exit 1
    fi
    log "go install failed, retrying in $((5 * attempt))s ($attempt/$ATTEMPTS)"
    sleep $((5 * attempt))
done

# `go install` just downloaded the module, so this only reads the module cache.
module_dir="$(env "${go_env[@]}" "$go" mod download -json "$pkg@$KUEUE_VERSION" |
    sed -n 's/^\t"Dir": "\(.*\)",$/\1/p')"
crds="$module_dir/config/components/crd/bases"
if ! compgen -G "$crds/kueue.x-k8s.io_*.yaml" >/dev/null; then
    log "no CRDs in $crds: the module layout changed"
    exit 1
fi
cp "$crds"/kueue.x-k8s.io_*.yaml "$staging/crds/"
chmod -R u+w "$staging/crds" # the module cache is read-only; the copies need not be

rm -rf "$target"
mv "$staging" "$target"
echo "$KUEUE_VERSION" >"$target/.complete"
link
log "built in $((SECONDS - started))s: $cache/bin/kueue"
