"""``make cluster``: the whole control plane plus the local executor, in the foreground, for humans.

    python -m kiln.testing.cluster [--fake-gpu-nodes N] [--no-executor] [--keep]

Prints the ``export KUBECONFIG=...`` line once everything is Ready and runs until Ctrl-C
(or SIGTERM), then stops every process it started.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from kiln.testing.binaries import ControlPlaneUnavailable
from kiln.testing.controlplane import ControlPlane, ControlPlaneConfig
from kiln.testing.nodes import EXECUTOR_NODE_LABEL, EXECUTOR_TAINT_KEY


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run a local Kubernetes control plane until Ctrl-C.")
    parser.add_argument("--fake-gpu-nodes", type=int, default=2, help="kwok nodes with 8 nvidia.com/gpu each")
    parser.add_argument("--no-executor", action="store_true", help="do not run pods as local processes")
    parser.add_argument("--keep", action="store_true", help="keep the state directory (logs, pod files) on exit")
    args = parser.parse_args(argv)

    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    config = ControlPlaneConfig(fake_gpu_nodes=args.fake_gpu_nodes, executor=not args.no_executor, keep_root=args.keep)
    print("starting etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kwok ...", flush=True)
    try:
        cluster = ControlPlane(config).start()
    except ControlPlaneUnavailable as error:
        print(error, file=sys.stderr)
        return 1
    try:
        print(f"control plane {cluster.kubernetes_version} ready in {cluster.startup_seconds:.1f}s")
        print(f"  state, component logs: {cluster.root}")
        print(f"  fake GPU nodes (kwok): {', '.join(cluster.fake_gpu_node_names) or 'none'}")
        if config.executor:
            print(f"  local executor node:   {cluster.executor_node}")
            print(f"    (select label {EXECUTOR_NODE_LABEL}=true and tolerate taint {EXECUTOR_TAINT_KEY})")
            print(f"    pod logs:            {cluster.executor_root}/pods/<namespace>/<pod>/<container>.log")
        print("\nIn another shell:\n")
        print(f"export KUBECONFIG={cluster.kubeconfig}\n", flush=True)
        print("Press Ctrl-C to stop.", flush=True)
        stop.wait()
        print("\nstopping ...", flush=True)
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
