#!/usr/bin/env python3
"""Build etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok from the Go module proxy.

All five binaries come from the one wrapper module next to this file (``go.mod``/``go.sum``,
committed, so every version is pinned and reviewed). They are built by a single ``go build``
so the packages they share (client-go, apimachinery, grpc, etcd client, ...) compile once.
Versions were chosen to line up: kwok v0.7.0 was cut against k8s.io/* v0.33.0 and etcd
client 3.5.21, exactly what Kubernetes 1.33 pins, so nothing is compiled twice.

``go install k8s.io/kubernetes/cmd/...@v1.33.x`` does not work: k8s.io/kubernetes requires its
staging modules at v0.0.0 and replaces them with ``./staging/...``. The wrapper module replaces
each of them with its published ``v0.33.x`` instead; ``--regenerate`` derives that list from
the tag's own go.mod.

Output goes to a cache outside the clone,
``${KILN_CONTROLPLANE_CACHE:-${XDG_CACHE_HOME:-~/.cache}/kiln/controlplane}/<versions>-<hash>/bin``,
where the hash covers go.mod, go.sum and this script. A warm run only checks a stamp file.
The last line printed is the bin directory (``--print-bin-dir`` prints only that, building
nothing).

Standard library only: ``make test`` runs this before the virtualenv matters.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

KUBERNETES_VERSION = "v1.33.13"
ETCD_VERSION = "v3.5.21"
KWOK_VERSION = "v0.7.0"

MODULE_DIR = Path(__file__).resolve().parent
WRAPPER_MODULE = "github.com/kiln/kiln/controlplane"
GO_LANGUAGE_VERSION = "1.24.0"  # what k8s.io/kubernetes 1.33 declares; godebug follows the main module

# Binary name -> package path. `go build -o DIR/` names each binary after the last path element.
BINARIES = {
    "etcd": "go.etcd.io/etcd/server/v3",
    "kube-apiserver": "k8s.io/kubernetes/cmd/kube-apiserver",
    "kube-controller-manager": "k8s.io/kubernetes/cmd/kube-controller-manager",
    "kube-scheduler": "k8s.io/kubernetes/cmd/kube-scheduler",
    "kwok": "sigs.k8s.io/kwok/cmd/kwok",
}
# Upstream's own flags for static server binaries (k/k hack/lib/golang.sh).
BUILD_TAGS = "selinux,notest"
ATTEMPTS = 4  # the module proxy occasionally drops a connection mid-download


def log(message: str) -> None:
    print(f"[controlplane] {message}", file=sys.stderr, flush=True)


def go_binary() -> str:
    found = shutil.which("go") or "/usr/local/go/bin/go"
    if not Path(found).exists():
        sys.exit("[controlplane] Go is not installed: need go >= 1.24 on PATH or at /usr/local/go/bin/go")
    return found


def go_env() -> dict[str, str]:
    env = dict(os.environ)
    # Never download a toolchain; never let the proxy rewrite our pinned go.sum.
    env.update(GOTOOLCHAIN="local", CGO_ENABLED="0", GOFLAGS="-mod=readonly", GOWORK="off")
    return env


def run_go(args: list[str], *, capture: bool = False, progress_every: int = 0) -> str:
    """Run go, retrying what looks like a transient network failure.

    With ``progress_every``, go's stderr (``-v`` package names) is summarised as a count.
    """
    command = [go_binary(), *args]
    for attempt in range(1, ATTEMPTS + 1):
        process = subprocess.Popen(
            command, cwd=MODULE_DIR, env=go_env(), text=True,
            stdout=subprocess.PIPE if capture else None, stderr=subprocess.PIPE,
        )
        assert process.stderr is not None
        stderr_lines = []
        for line in process.stderr:
            stderr_lines.append(line)
            if progress_every and len(stderr_lines) % progress_every == 0:
                log(f"... {len(stderr_lines)} packages compiled, latest {line.strip()}")
        stdout = process.stdout.read() if process.stdout else ""
        if process.wait() == 0:
            return stdout
        stderr = "".join(stderr_lines)
        sys.stderr.write(stderr[-20_000:])
        if attempt == ATTEMPTS or not looks_transient(stderr):
            sys.exit(f"[controlplane] `go {' '.join(args[:2])} ...` failed (exit {process.returncode})")
        delay = 5 * attempt
        log(f"transient failure, retrying in {delay}s ({attempt}/{ATTEMPTS})")
        time.sleep(delay)
    raise AssertionError("unreachable")


def looks_transient(stderr: str) -> bool:
    markers = ("timeout", "connection reset", "TLS handshake", "unexpected EOF", "502", "503", "504",
               "i/o timeout", "no such host", "temporary failure", "connection refused")
    return any(marker.lower() in stderr.lower() for marker in markers)


def version_ldflags() -> str:
    """Stamp the Kubernetes and kwok versions; unstamped builds report v0.0.0-master."""
    major, minor, _ = KUBERNETES_VERSION.removeprefix("v").split(".")
    build_date = module_release_time("k8s.io/kubernetes", KUBERNETES_VERSION)
    flags = ["-s", "-w"]
    for package in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        flags += [
            f"-X {package}.gitVersion={KUBERNETES_VERSION}",
            f"-X {package}.gitMajor={major}",
            f"-X {package}.gitMinor={minor}",
            f"-X {package}.gitTreeState=clean",
            f"-X {package}.buildDate={build_date}",
        ]
    flags += [
        f"-X sigs.k8s.io/kwok/pkg/consts.Version={KWOK_VERSION.removeprefix('v')}",
        f"-X sigs.k8s.io/kwok/pkg/consts.KubeVersion={KUBERNETES_VERSION.removeprefix('v')}",
    ]
    return " ".join(flags)


def module_release_time(path: str, version: str) -> str:
    """The tag's publication time from the proxy: a reproducible buildDate."""
    info = json.loads(run_go(["mod", "download", "-json", f"{path}@{version}"], capture=True))
    return json.loads(Path(info["Info"]).read_text())["Time"]


def cache_root() -> Path:
    if configured := os.environ.get("KILN_CONTROLPLANE_CACHE"):
        return Path(configured)
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "kiln" / "controlplane"


def build_flags() -> list[str]:
    return ["-trimpath", "-buildvcs=false", f"-tags={BUILD_TAGS}", f"-ldflags={version_ldflags()}"]


def bin_dir() -> Path:
    # This script is hashed too: a change of versions, flags or binaries means a new directory.
    digest = hashlib.sha256()
    for path in (MODULE_DIR / "go.mod", MODULE_DIR / "go.sum", Path(__file__).resolve()):
        digest.update(path.read_bytes())
    versions = f"k8s-{KUBERNETES_VERSION}-etcd-{ETCD_VERSION}-kwok-{KWOK_VERSION}"
    return cache_root() / f"{versions}-{digest.hexdigest()[:12]}" / "bin"


def build() -> Path:
    target = bin_dir()
    target.parent.mkdir(parents=True, exist_ok=True)
    # Two `make test` runs at once: the second waits for the first build, then finds it done.
    with (target.parent / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / ".complete").exists() and all((target / name).exists() for name in BINARIES):
            log(f"up to date: {target}")
            return target
        _build_into(target)
    return target


def check_go_mod_matches_versions() -> None:
    go_mod = (MODULE_DIR / "go.mod").read_text()
    for module, version in (("k8s.io/kubernetes", KUBERNETES_VERSION), ("go.etcd.io/etcd/server/v3", ETCD_VERSION),
                            ("sigs.k8s.io/kwok", KWOK_VERSION)):
        if f"\t{module} {version}" not in go_mod:
            sys.exit(f"[controlplane] go.mod does not pin {module} {version}: run `{__file__} --regenerate`")


def _build_into(target: Path) -> None:
    check_go_mod_matches_versions()
    log(f"building k8s {KUBERNETES_VERSION}, etcd {ETCD_VERSION}, kwok {KWOK_VERSION} into {target}")
    log("downloading modules (cold: a few minutes)")
    started = time.monotonic()
    run_go(["mod", "download"])
    log(f"compiling {', '.join(BINARIES)} (cold on 2 idle cores: about 6 minutes; warm: seconds)")
    staging = target.with_name("bin.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    run_go(["build", "-v", *build_flags(), "-o", f"{staging}/", *BINARIES.values()], progress_every=250)
    # `go build -o DIR/` names etcd after its package path minus the major suffix: "server".
    (staging / "server").rename(staging / "etcd")
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    versions = {"kubernetes": KUBERNETES_VERSION, "etcd": ETCD_VERSION, "kwok": KWOK_VERSION}
    (target / ".complete").write_text(json.dumps(versions))
    log(f"built in {time.monotonic() - started:.0f}s")


def regenerate_go_mod() -> None:
    """Rewrite go.mod from the pinned versions; replaces come from the Kubernetes tag's go.mod."""
    info = json.loads(run_go(["mod", "download", "-json", f"k8s.io/kubernetes@{KUBERNETES_VERSION}"],
                             capture=True))
    upstream = Path(info["GoMod"]).read_text()
    staging = sorted({
        line.split("=>")[0].split()[0]
        for line in upstream.splitlines()
        if "=> ./staging/" in line
    })
    published = "v0." + KUBERNETES_VERSION.removeprefix("v1.")
    lines = [
        "// Generated by `controlplane/build.py --regenerate`; edit the versions there, not here.",
        f"module {WRAPPER_MODULE}",
        "",
        f"go {GO_LANGUAGE_VERSION}",
        "",
        "godebug default=go1.24",
        "",
        *(f"tool {package}" for package in BINARIES.values()),
        "",
        "require (",
        f"\tgo.etcd.io/etcd/server/v3 {ETCD_VERSION}",
        f"\tk8s.io/kubernetes {KUBERNETES_VERSION}",
        f"\tsigs.k8s.io/kwok {KWOK_VERSION}",
        ")",
        "",
        "replace (",
        *(f"\t{module} => {module} {published}" for module in staging),
        ")",
        "",
    ]
    (MODULE_DIR / "go.mod").write_text("\n".join(lines))
    (MODULE_DIR / "go.sum").unlink(missing_ok=True)
    log(f"wrote go.mod with {len(staging)} staging replaces at {published}; resolving go.sum")
    env = go_env() | {"GOFLAGS": "-mod=mod"}
    subprocess.run([go_binary(), "mod", "tidy"], cwd=MODULE_DIR, env=env, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--print-bin-dir", action="store_true", help="print the bin dir and exit")
    parser.add_argument("--regenerate", action="store_true", help="rewrite go.mod/go.sum, then build")
    args = parser.parse_args()
    if args.print_bin_dir:
        print(bin_dir())
        return
    if args.regenerate:
        regenerate_go_mod()
    print(build())


if __name__ == "__main__":
    main()
