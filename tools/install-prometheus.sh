#!/usr/bin/env bash
# Prometheus and promtool from Debian (bookworm: 2.42): the tests run the alert rules' unit tests with promtool and
# every dashboard query against a real Prometheus. See tools/README.md.
#
# Only the binaries are used: the Debian package also installs and enables a system service, which this script
# never starts (the tests run `prometheus` on loopback with their own config and a temporary storage directory).
# If the package's postinst started it anyway (a fresh machine with systemd), it is stopped again.
set -euo pipefail
cache="${KILN_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kiln/tools}"
log() { echo "[install-prometheus] $*" >&2; }
mkdir -p "$cache/bin"
if ! dpkg -s prometheus >/dev/null 2>&1; then
    log "installing the Debian package prometheus"
    sudo=""
    [[ "$(id -u)" -ne 0 ]] && sudo="sudo"
    $sudo apt-get update
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus
    if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet prometheus 2>/dev/null; then
        $sudo systemctl disable --now prometheus || true
    fi
fi
for tool in prometheus promtool; do
    ln -sfn "/usr/bin/$tool" "$cache/bin/$tool"
done
log "up to date: $("$cache/bin/prometheus" --version 2>&1 | head -1)"
