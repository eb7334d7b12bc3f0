#!/usr/bin/env bash
# Helm v3, built from the Go module proxy (no Debian package, no PyPI wheel ships the CLI); see tools/README.md.
#
# `go install helm.sh/helm/v3/cmd/helm@VERSION` builds with helm's own go.mod pins (it has no replace
# directives), so the binary is the release's dependency set. The ldflags are upstream's (helm's Makefile):
# without them `helm version` says "v3.22" with no patch, and `.Capabilities.KubeVersion` (helm template,
# helm lint's deprecation check) is v1.20.0. Upstream derives that Kubernetes version from its client-go;
# here it is the test control plane's (KUBERNETES_VERSION in controlplane/build.py, read, not repeated), so
# offline renders and lint judge the chart against the cluster the tests run it on.
#
# Cached in <cache>/helm/<version>-k8s<major.minor>-<hash of this script>/ (a new pin, flag or Kubernetes
# minor is a new directory), built under a lock (two `make test` runs at once: the second waits, then finds it
# done), marked complete by a stamp, linked as <cache>/bin/helm. Warm: a stamp check. Cold: about 3 minutes
# on 2 idle cores (module download included).
set -euo pipefail

HELM_VERSION=v3.22.0
ATTEMPTS=4 # the module proxy occasionally drops a connection mid-download

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
cache="${KILN_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kiln/tools}"
log() { echo "[install-helm] $*" >&2; }

k8s_version="$(sed -n 's/^KUBERNETES_VERSION = "v\([0-9.]*\)"$/\1/p' "$repo/controlplane/build.py")"
if [[ ! "$k8s_version" =~ ^([0-9]+)\.([0-9]+)\.[0-9]+$ ]]; then
    log "controlplane/build.py: KUBERNETES_VERSION not found (expected KUBERNETES_VERSION = \"v1.X.Y\")"
    exit 1
fi
k8s_major="${BASH_REMATCH[1]}" k8s_minor="${BASH_REMATCH[2]}"

script_hash="$(sha256sum "${BASH_SOURCE[0]}" | cut -c1-12)"
target="$cache/helm/$HELM_VERSION-k8s$k8s_major.$k8s_minor-$script_hash"

link() {
    mkdir -p "$cache/bin"
    ln -sfn "$target/helm" "$cache/bin/helm"
}

mkdir -p "$cache/helm"
exec 9>"$cache/helm/.lock"
flock 9
if [[ -f "$target/.complete" && -x "$target/helm" ]]; then
    link
    log "up to date: $target/helm"
    exit 0
fi

go="$(command -v go || echo /usr/local/go/bin/go)"
if [[ ! -x "$go" ]]; then
    log "Go is not installed: need go >= 1.26 (helm $HELM_VERSION's go.mod) on PATH or at /usr/local/go/bin/go"
    exit 1
fi

pkg=helm.sh/helm/v3
ldflags=(
    -s -w
    "-X $pkg/internal/version.version=$HELM_VERSION"
    "-X $pkg/internal/version.gitTreeState=clean" # gitCommit stays empty: the proxy's zip carries no commit
    "-X $pkg/pkg/chartutil.k8sVersionMajor=$k8s_major"
    "-X $pkg/pkg/chartutil.k8sVersionMinor=$k8s_minor"
    "-X $pkg/pkg/lint/rules.k8sVersionMajor=$k8s_major"
    "-X $pkg/pkg/lint/rules.k8sVersionMinor=$k8s_minor"
)
staging="$target.partial"
rm -rf "$staging"
mkdir -p "$staging"
log "building helm $HELM_VERSION (Kubernetes $k8s_major.$k8s_minor capabilities) into $target (cold: about 3 minutes)"
started=$SECONDS
for attempt in $(seq 1 "$ATTEMPTS"); do
    # Never download a toolchain; a static binary, like upstream's release builds.
    if GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-buildvcs=false GOWORK=off GOBIN="$staging" \
        "$go" install -trimpath -ldflags "${ldflags[*]}" "$pkg/cmd/helm@$HELM_VERSION"; then
        break
    fi
    if ((attempt == ATTEMPTS)); then
        log "go install $pkg/cmd/helm@$HELM_VERSION failed $ATTEMPTS times"
        exit 1
    fi
    log "go install failed, retrying in $((5 * attempt))s ($attempt/$ATTEMPTS)"
    sleep $((5 * attempt))
done

reported="$("$staging/helm" version --template '{{.Version}}')"
if [[ "$reported" != "$HELM_VERSION" ]]; then
    log "the built helm reports $reported, not $HELM_VERSION: the version ldflags did not apply"
    exit 1
fi
rm -rf "$target"
mv "$staging" "$target"
echo "$HELM_VERSION kubernetes=$k8s_major.$k8s_minor" >"$target/.complete"
link
log "built in $((SECONDS - started))s: $cache/bin/helm"
