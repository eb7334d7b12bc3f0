"""``kiln dev up``: the cluster path on this machine, in one command, until Ctrl-C.

Starts, all on 127.0.0.1:

- the control plane (:mod:`kiln.testing.controlplane`) with kwok GPU nodes and the local executor, which runs
  pods as processes of this machine, and Kiln's CRDs;
- an S3 server (moto, :mod:`kiln.testing.s3`) holding a digits subset under ``s3://kiln-dev/digits/{train,val}``
  (the demo's images, ``kiln.trainer.demo``), and a Secret with its credentials in the ``default`` namespace;
- ``kiln operator``, whose defaults point every job at that S3 server, that Secret and an output root in the
  bucket, so ``examples/digits-cluster.yaml`` applies as it is.

Prints the ``export KUBECONFIG=...`` line, then waits; Ctrl-C or SIGTERM stops the operator, the control plane
(the executor kills its pods) and the S3 server, and removes the state directory unless ``keep`` is set.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from subprocess import Popen

from kiln.api.crd import KINDS, crd, to_yaml
from kiln.testing.binaries import ControlPlaneUnavailable
from kiln.testing.controlplane import ControlPlane, ControlPlaneConfig
from kiln.testing.kube import namespaced
from kiln.testing.nodes import EXECUTOR_NODE_LABEL
from kiln.testing.processes import free_port, spawn_in_new_group, stop_group, wait_until
from kiln.testing.s3 import S3Server

BUCKET = "kiln-dev"
"""The one bucket: the digits under digits/, every job's outputs and checkpoints under runs/."""
NAMESPACE = "default"
"""Where the credentials Secret lives; the operator looks a job's Secret up in the job's own namespace."""
SECRET = "kiln-dev-s3"
"""The Secret with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, the operator's default secretRef."""
DIGITS_PER_CLASS = {"train": 30, "val": 10}
"""300 training and 100 validation images: each pod stages every object from moto one request at a time, so the
full 1,797 would cost minutes on a busy laptop; `make demo` trains on them all."""
UPLOAD_THREADS = 8
PROGRESS_INTERVAL_S = "1"
"""The operator's poll of rank 0's /progress: every second, so `kubectl kiln watch` moves smoothly."""
OPERATOR_READY_S = 60.0
OPERATOR_CHECK_S = 5.0
"""How often dev up checks that the operator still runs."""


class DevCluster:
    """Everything ``kiln dev up`` runs; ``start()`` then ``stop()`` (safe after a failed or partial start)."""

    def __init__(self, *, fake_gpu_nodes: int = 2, keep: bool = False) -> None:
        self.control_plane = ControlPlane(ControlPlaneConfig(fake_gpu_nodes=fake_gpu_nodes, keep_root=keep))
        self.root = self.control_plane.root
        self.s3 = S3Server()
        self.operator: Popen[bytes] | None = None
        self.operator_log = self.control_plane.logs_dir / "kiln-operator.log"
        self.images = 0
        self._stopping = threading.Event()

    def start(self) -> DevCluster:
        # The S3 side (importing scikit-learn, writing PNGs, uploading) overlaps the control plane's start.
        with ThreadPoolExecutor(1, thread_name_prefix="kiln-dev-s3") as pool:
            s3_ready: Future[int] = pool.submit(self._start_s3)
            try:
                self.control_plane.start()
            except BaseException:
                self._stopping.set()  # the remaining uploads are skipped, so leaving the pool is quick
                raise
            self.images = s3_ready.result()
        self._install_crds()
        self._create_secret()
        self._start_operator()
        return self

    def stop(self) -> None:
        """Operator first (it must not react to pods vanishing), then the control plane and its pods, then S3."""
        self._stopping.set()
        if self.operator is not None:
            stop_group(self.operator, grace_seconds=10.0)
            self.operator = None
        self.control_plane.stop()
        self.s3.stop()

    # -- S3 ---------------------------------------------------------------------------------------------------

    def _start_s3(self) -> int:
        from kiln.trainer.demo import materialize  # scikit-learn's digits as PNG folders

        self.s3.start()
        self.s3.create_bucket(BUCKET)
        local = materialize(self.root / "digits")
        files = [
            (image, f"digits/{split}/{folder.name}/{image.name}")
            for split, per_class in DIGITS_PER_CLASS.items()
            for folder in sorted((local / split).iterdir())
            for image in sorted(folder.glob("*.png"))[:per_class]
        ]
        client = self.s3.client()

        def upload(entry: tuple[Path, str]) -> None:
            if not self._stopping.is_set():
                client.put_object(Bucket=BUCKET, Key=entry[1], Body=entry[0].read_bytes())

        with ThreadPoolExecutor(UPLOAD_THREADS, thread_name_prefix="kiln-dev-upload") as uploads:
            list(uploads.map(upload, files))
        return len(files)

    def _create_secret(self) -> None:
        env = self.s3.env
        self.control_plane.kube.create(
            namespaced("secrets", NAMESPACE),
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": SECRET},
                "stringData": {key: env[key] for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")},
            },
        )

    # -- the cluster side -------------------------------------------------------------------------------------

    def _install_crds(self) -> None:
        """The CRDs as kiln.api generates them (what `kiln crds` commits), so no checkout path is needed."""
        crd_dir = self.root / "crds"
        crd_dir.mkdir()
        paths = []
        for kind in KINDS:
            path = crd_dir / f"{kind.crd_name}.yaml"
            path.write_text(to_yaml(crd(kind)))
            paths.append(path)
        self.control_plane.install_crds(paths)

    def _start_operator(self) -> None:
        metrics_port = free_port()
        env = {
            **os.environ,
            "KUBECONFIG": str(self.control_plane.kubeconfig),
            "KILN_OPERATOR_ENDPOINT_URL": self.s3.endpoint_url,
            "KILN_OPERATOR_SECRET_REF": SECRET,
            "KILN_OPERATOR_STORAGE_ROOT": f"s3://{BUCKET}/runs",
            "KILN_OPERATOR_METRICS_PORT": str(metrics_port),
            "KILN_OPERATOR_PROGRESS_INTERVAL_S": PROGRESS_INTERVAL_S,
            # A Lease that rides out the seconds-long apiserver stalls of a busy laptop (tests/operator does the same).
            "KILN_OPERATOR_LEASE_DURATION_S": "60",
            "KILN_OPERATOR_RENEW_DEADLINE_S": "45",
            "KILN_OPERATOR_RETRY_PERIOD_S": "2",
        }
        with self.operator_log.open("ab") as log:
            # Not from a checkout's root: `python -m` puts the working directory first on sys.path, where the
            # checkout's operator/ folder would shadow the standard library's operator module.
            self.operator = spawn_in_new_group([sys.executable, "-m", "kiln.cli", "operator"], log=log, env=env,
                                               cwd=self.root)  # fmt: skip
        wait_until(lambda: _http_ok(f"http://127.0.0.1:{metrics_port}/readyz"), timeout=OPERATOR_READY_S,
                   what="kiln operator /readyz", on_tick=self._operator_alive)  # fmt: skip

    def keep_operator_running(self, say: Callable[[str], None]) -> None:
        """Start the operator again if it exited (a lost Lease stops it), as its Deployment would in a cluster."""
        if self.operator is not None and self.operator.poll() is not None:
            say(f"kiln operator exited with code {self.operator.returncode} (log: {self.operator_log}); restarting it")
            stop_group(self.operator)
            self._start_operator()

    def _operator_alive(self) -> None:
        if self.operator is not None and self.operator.poll() is not None:
            tail = self.operator_log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"kiln operator exited with code {self.operator.returncode}:\n{tail}")

    def summary(self, seconds: float) -> str:
        cluster = self.control_plane
        return "\n".join([
            f"kiln dev up: ready in {seconds:.0f}s (control plane {cluster.kubernetes_version})",
            f"  state and component logs:  {self.root}   (operator: {self.operator_log.name})",
            f"  fake GPU nodes (kwok):     {', '.join(cluster.fake_gpu_node_names) or 'none'}",
            f"  local executor node:       {cluster.executor_node} (label {EXECUTOR_NODE_LABEL}=true); pods run here",
            f"  S3 (moto):                 {self.s3.endpoint_url}, {self.images} digits under s3://{BUCKET}/digits/",
            f"  credentials Secret:        {NAMESPACE}/{SECRET} (the operator's default secretRef)",
            f"  job outputs:               s3://{BUCKET}/runs/<namespace>/<name>",
            "",
            "In another shell:",
            "",
            f"export KUBECONFIG={cluster.kubeconfig}",
            "kubectl apply -f examples/digits-cluster.yaml",
            "kubectl kiln watch digits",
            "",
            "Press Ctrl-C to stop.",
        ])  # fmt: skip


def _http_ok(url: str) -> bool:
    import urllib.request

    with urllib.request.urlopen(url, timeout=2) as response:
        return bool(response.status == 200)


def _say(text: str) -> None:
    print(text, flush=True)  # at once, also into a pipe: whoever waits for the KUBECONFIG line reads it now


def run_until_stopped(*, fake_gpu_nodes: int = 2, keep: bool = False, say: Callable[[str], None] = _say) -> int:
    """Start everything, print the KUBECONFIG line, wait for Ctrl-C or SIGTERM, stop everything. Exit code 0, or 1
    when the start fails (the reason on stderr)."""
    # SIGTERM takes Ctrl-C's path, so `kill` cleans up as well, during the start too. SIGINT is set explicitly: a
    # shell without job control starts background commands with it ignored, and Python then keeps it so.
    previous = {signum: signal.signal(signum, signal.default_int_handler) for signum in (signal.SIGINT, signal.SIGTERM)}
    started = time.monotonic()
    dev = DevCluster(fake_gpu_nodes=fake_gpu_nodes, keep=keep)
    say("starting the control plane, an S3 server with the digits, and the operator ...")
    try:
        dev.start()
        say(dev.summary(time.monotonic() - started))
        while True:
            time.sleep(OPERATOR_CHECK_S)
            dev.keep_operator_running(say)
    except KeyboardInterrupt:
        say("\nstopping ...")
        return 0
    except (ControlPlaneUnavailable, RuntimeError, TimeoutError) as error:
        print(f"kiln dev up: {error}", file=sys.stderr)
        return 1
    finally:
        # A second Ctrl-C must not cut the teardown short and leave processes behind.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            dev.stop()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
