"""The local pod executor: a "process kubelet" that runs the pods bound to one node as processes.

    python -m kiln.testing.executor --kubeconfig admin.kubeconfig --node-name kiln-local-executor --root DIR

It registers its Node (tainted, see ``kiln.testing.nodes``), heartbeats its status and Lease, serves the
containers' logs to the apiserver as a kubelet does (``kiln.testing.kubelet_logs``: ``kubectl logs`` works),
and reconciles level-triggered every ``--sync-interval``: list the node's pods, start the new
ones, report exits, honour deletions (SIGTERM to the process group, SIGKILL after the grace
period, then delete the object with grace 0). SIGTERM/SIGINT to the executor kills every pod
it runs before it exits.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import logging
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit

from kiln.testing import executor_layout, pod_status
from kiln.testing.kube import JSON, MERGE, ApiError, KubeClient, namespaced
from kiln.testing.kubelet_logs import KubeletLogServer
from kiln.testing.localpod import Launch, PodConfigError, UnsupportedPod, container_ports, prepare_launch
from kiln.testing.nodes import executor_node, executor_node_status
from kiln.testing.processes import port_is_free, signal_group, spawn_in_new_group

logger = logging.getLogger("kiln.testing.executor")

HEARTBEAT_SECONDS = 10.0  # the kubelet's default node status/lease renewal period
LEASE_DURATION_SECONDS = 40
DEFAULT_GRACE_SECONDS = 30
RESTART_DELAY_SECONDS = 1.0
CONFIG_RETRY_SECONDS = 1.0  # a pod waiting for a ConfigMap/Secret is retried this often
# Pods here share the host's network, so a pod whose containerPort another process still holds (a previous
# attempt's torchrun on the rendezvous port, still dying under load) would fail with EADDRINUSE where a real
# pod, in a network namespace of its own, would not. Such a pod waits, polled this often, up to this long;
# after that it starts anyway and the collision shows in its log.
PORT_POLL_SECONDS = 0.5
PORT_WAIT_SECONDS = 60.0
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"


def job_key(pod: JSON) -> tuple[str, str] | None:
    """The (namespace, name) of the Job that owns the pod: Job names repeat across namespaces."""
    job = pod["metadata"].get("labels", {}).get(JOB_NAME_LABEL)
    return None if job is None else (pod["metadata"].get("namespace", ""), job)


@dataclass
class LocalContainer:
    """What the executor knows about one pod's process (by pod uid)."""

    pod: JSON
    launch: Launch | None = None
    process: subprocess.Popen[bytes] | None = None
    log: IO[bytes] | None = None
    started_at: str = ""
    restarts: int = 0
    last: pod_status.Terminated | None = None
    start_at: float = 0.0  # monotonic time of the next (re)start attempt
    kill_at: float | None = None  # monotonic deadline for SIGKILL once deletion began
    finished: bool = False
    reported_waiting: str = ""
    port_wait_until: float | None = None  # monotonic deadline of the wait for busy containerPorts

    @property
    def key(self) -> str:
        return f"{self.pod['metadata']['namespace']}/{self.pod['metadata']['name']}"


class Executor:
    def __init__(
        self, kube: KubeClient, *, node_name: str, root: Path, kubelet_version: str, sync_interval: float = 0.3
    ):
        self.kube = kube
        self.node_name = node_name
        self.root = root
        self.kubelet_version = kubelet_version
        self.sync_interval = sync_interval
        self.apiserver_port = urlsplit(kube.server).port or 443
        self.containers: dict[str, LocalContainer] = {}
        self._deleted: set[str] = set()  # uids whose final grace-0 delete was sent
        self._ready_since = pod_status.now()
        self._next_heartbeat = 0.0
        self._logs: KubeletLogServer | None = None

    def run(self, stop: threading.Event) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self._logs = KubeletLogServer(self.root, self.may_write_log, self.node_name).start()
        self.register_node()
        try:
            while not stop.is_set():
                if time.monotonic() >= self._next_heartbeat:
                    self.heartbeat()
                self.sync()
                stop.wait(self.sync_interval)
        finally:
            self.kill_all()
            self._logs.close()

    def may_write_log(self, namespace: str, pod: str) -> bool:
        """Whether a pod's container may still write to its log (called from the log server's threads)."""
        key = f"{namespace}/{pod}"
        return any(c.key == key and not c.finished for c in list(self.containers.values()))

    # -- node -------------------------------------------------------------------------------------

    def register_node(self) -> None:
        node = executor_node(self.node_name, self.kubelet_version)
        try:
            self.kube.create("/api/v1/nodes", node)
        except ApiError as error:
            if error.status != 409:
                raise
            self.kube.patch(f"/api/v1/nodes/{self.node_name}", node)
        self.heartbeat()

    def heartbeat(self) -> None:
        port = self._logs.port if self._logs is not None else None
        status = executor_node_status(self.kubelet_version, pod_status.now(), self._ready_since, port)
        try:
            self.kube.patch(f"/api/v1/nodes/{self.node_name}/status", {"status": status})
            self._renew_lease()
            self._next_heartbeat = time.monotonic() + HEARTBEAT_SECONDS
        except (ApiError, OSError) as error:
            logger.warning("heartbeat failed (retrying): %s", error)

    def _renew_lease(self) -> None:
        renewed = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        lease = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": self.node_name, "namespace": "kube-node-lease"},
            "spec": {
                "holderIdentity": self.node_name,
                "leaseDurationSeconds": LEASE_DURATION_SECONDS,
                "renewTime": renewed,
            },
        }
        path = namespaced("leases", "kube-node-lease", group_version="coordination.k8s.io/v1")
        try:
            self.kube.patch(f"{path}/{self.node_name}", {"spec": lease["spec"]}, content_type=MERGE)
        except ApiError as error:
            if error.status != 404:
                raise
            self.kube.create(path, lease)

    # -- pods -------------------------------------------------------------------------------------

    def sync(self) -> None:
        try:
            pods = self.kube.get("/api/v1/pods", fieldSelector=f"spec.nodeName={self.node_name}")["items"]
        except (ApiError, OSError) as error:
            logger.warning("listing pods failed (retrying): %s", error)
            return
        seen = set()
        for pod in pods:
            uid = pod["metadata"]["uid"]
            seen.add(uid)
            try:
                self.sync_pod(pod)
            except (ApiError, OSError) as error:
                logger.warning("syncing pod %s failed (retrying): %s", pod["metadata"]["name"], error)
        for uid in set(self.containers) - seen:  # gone, e.g. force-deleted behind our back
            self._reap(self.containers.pop(uid))
        self._deleted &= seen

    def sync_pod(self, pod: JSON) -> None:
        uid = pod["metadata"]["uid"]
        deleting = bool(pod["metadata"].get("deletionTimestamp"))
        container = self.containers.get(uid)
        if container is None:
            if deleting or pod.get("status", {}).get("phase") in ("Succeeded", "Failed"):
                # Never ran here (or ran before an executor restart): nothing left to stop.
                if deleting:
                    self._finalize_deletion(pod)
                return
            container = self.containers[uid] = LocalContainer(pod)
        container.pod = pod
        if deleting and container.process is None:
            container.finished = True  # waiting for config or a restart: nothing to stop
        if container.process is None and not container.finished and time.monotonic() >= container.start_at:
            if self._ports_held_elsewhere(container):
                container.start_at = time.monotonic() + PORT_POLL_SECONDS
                return
            if container.launch is None:
                self._start(container)
            else:
                self._spawn(container)
        if container.process is not None:
            if deleting:
                self._terminate_for_deletion(container)
            if container.process.poll() is not None:
                self._on_exit(container, deleting)
        if container.finished and deleting:
            self._finalize_deletion(pod)

    def _ports_held_elsewhere(self, container: LocalContainer) -> bool:
        """Whether a containerPort of this pod is taken by anything but its own Job's pods (whose rank 0 legitimately
        holds the rendezvous port the others declare too), within the wait's deadline. Taken means declared by a live
        pod of another Job here, bound or not yet (a torchrun still importing binds seconds after it starts), or
        bound by a process the executor did not start."""
        job = job_key(container.pod)
        peers = [other for other in self.containers.values() if other.process and other.process.poll() is None]
        reserved = {
            port for other in peers if job is None or job_key(other.pod) != job for port in container_ports(other.pod)
        }
        job_is_running = job is not None and any(job_key(other.pod) == job for other in peers)
        busy = [
            port
            for port in container_ports(container.pod)
            if port in reserved or (not job_is_running and not port_is_free(port))
        ]
        if not busy:
            return False
        now = time.monotonic()
        if container.port_wait_until is None:
            container.port_wait_until = now + PORT_WAIT_SECONDS
            logger.info("pod %s waits for host ports %s, held by another process", container.key, busy)
        return now < container.port_wait_until

    def _start(self, container: LocalContainer) -> None:
        pod = container.pod
        try:
            container.launch = prepare_launch(self.kube, pod, self.root, self.apiserver_port)
        except PodConfigError as error:
            container.start_at = time.monotonic() + CONFIG_RETRY_SECONDS
            if container.reported_waiting != str(error):
                self._patch_status(pod, pod_status.waiting(pod, "CreateContainerConfigError", str(error)))
                container.reported_waiting = str(error)
            return
        except UnsupportedPod as error:
            logger.error("pod %s cannot run locally: %s", container.key, error)
            self._patch_status(pod, pod_status.failed_to_start(pod, "UnsupportedByLocalExecutor", str(error)))
            container.finished = True
            return
        self._spawn(container)

    def _spawn(self, container: LocalContainer) -> None:
        launch = container.launch
        assert launch is not None
        launch.log_path.parent.mkdir(parents=True, exist_ok=True)
        container.log = launch.log_path.open("ab")
        try:
            container.process = spawn_in_new_group(launch.argv, log=container.log, env=launch.env, cwd=launch.cwd)
        except OSError as error:  # no such command: the runtime's StartError, exit code 128
            container.log.write(f"executor: cannot start {launch.argv[0]!r}: {error}\n".encode())
            self._finish(container, pod_status.Terminated(128, str(error), pod_status.now(), pod_status.now(), ""))
            return
        executor_layout.record_group(self.root, container.process.pid)
        container.started_at = pod_status.now()
        logger.info(
            "started pod %s as pid %d, log %s: %s", container.key, container.process.pid, launch.log_path, launch.argv
        )
        self._patch_status(
            container.pod,
            pod_status.running(
                container.pod,
                started_at=container.started_at,
                container_id=self._container_id(container),
                restarts=container.restarts,
                last=container.last,
            ),
        )

    def _on_exit(self, container: LocalContainer, deleting: bool) -> None:
        process, launch = container.process, container.launch
        assert process is not None and launch is not None
        code = pod_status.exit_code(process.wait())
        executor_layout.forget_group(self.root, process.pid)
        signal_group(process, signal.SIGKILL)  # whatever the container left behind in its group
        if container.log is not None:
            container.log.close()
        spec_container = container.pod["spec"]["containers"][0]
        message = pod_status.termination_message(
            launch.termination_message_path.read_bytes() if launch.termination_message_path.exists() else b"",
            _tail(launch.log_path),
            policy=spec_container.get("terminationMessagePolicy", "File"),
            failed=code != 0,
        )
        result = pod_status.Terminated(
            code, message, container.started_at, pod_status.now(), self._container_id(container)
        )
        logger.info("pod %s exited with code %d", container.key, code)
        container.process = None
        policy = container.pod["spec"].get("restartPolicy", "Always")
        if not deleting and (policy == "Always" or (policy == "OnFailure" and code != 0)):
            container.restarts += 1
            container.last = result
            container.start_at = time.monotonic() + RESTART_DELAY_SECONDS  # a token CrashLoopBackOff
            return
        self._finish(container, result)

    def _finish(self, container: LocalContainer, result: pod_status.Terminated) -> None:
        container.finished = True
        container.process = None
        if container.log is not None:
            container.log.close()
        self._patch_status(container.pod, pod_status.terminated(container.pod, result, restarts=container.restarts))

    def _terminate_for_deletion(self, container: LocalContainer) -> None:
        if container.kill_at is None:
            meta = container.pod["metadata"]
            grace = meta.get("deletionGracePeriodSeconds")
            if grace is None:
                grace = container.pod["spec"].get("terminationGracePeriodSeconds", DEFAULT_GRACE_SECONDS)
            logger.info("pod %s is being deleted: SIGTERM, SIGKILL in %ss", container.key, grace)
            self._kill(container, signal.SIGTERM)
            container.kill_at = time.monotonic() + grace
        elif time.monotonic() >= container.kill_at:
            self._kill(container, signal.SIGKILL)

    def _kill(self, container: LocalContainer, signum: int) -> None:
        if container.process is not None:
            signal_group(container.process, signum)

    def _finalize_deletion(self, pod: JSON) -> None:
        """What a kubelet does once the containers are gone: delete the object for good."""
        meta = pod["metadata"]
        if meta["uid"] in self._deleted:
            return  # sent already; finalizers (e.g. the Job controller's) may hold the object a while
        body = {
            "apiVersion": "v1",
            "kind": "DeleteOptions",
            "gracePeriodSeconds": 0,
            "preconditions": {"uid": meta["uid"]},
        }
        try:
            self.kube.delete(namespaced("pods", meta["namespace"], meta["name"]), body)
        except ApiError as error:
            if error.status not in (404, 409):
                raise
        self._deleted.add(meta["uid"])

    def _patch_status(self, pod: JSON, body: JSON) -> None:
        meta = pod["metadata"]
        body.setdefault("metadata", {})["uid"] = meta["uid"]  # never patch a same-named successor
        self.kube.patch(namespaced("pods", meta["namespace"], meta["name"]) + "/status", body)

    @staticmethod
    def _container_id(container: LocalContainer) -> str:
        return f"kiln://{container.process.pid}" if container.process else "kiln://exited"

    def kill_all(self) -> None:
        """Stop every pod process: SIGTERM, a short grace, then SIGKILL (the executor is going away)."""
        running = [c for c in self.containers.values() if c.process is not None and c.process.poll() is None]
        for container in running:
            self._kill(container, signal.SIGTERM)
        deadline = time.monotonic() + 5
        for container in running:
            assert container.process is not None
            with contextlib.suppress(subprocess.TimeoutExpired):
                container.process.wait(timeout=max(0.0, deadline - time.monotonic()))
        for container in self.containers.values():
            self._reap(container)

    def _reap(self, container: LocalContainer) -> None:
        """SIGKILL the container's group and collect its exit, without reporting anything."""
        if container.process is not None:
            self._kill(container, signal.SIGKILL)
            container.process.wait()
            executor_layout.forget_group(self.root, container.process.pid)
            container.process = None
        if container.log is not None:
            container.log.close()


def _tail(path: Path, limit: int = 64 * 1024) -> bytes:
    if not path.exists():
        return b""
    with path.open("rb") as log:
        log.seek(max(0, path.stat().st_size - limit))
        return log.read()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run the pods bound to one node as local processes.")
    parser.add_argument("--kubeconfig", type=Path, required=True)
    parser.add_argument("--node-name", required=True)
    parser.add_argument("--root", type=Path, required=True, help="pod files and logs go here")
    parser.add_argument("--kubelet-version", default="v0.0.0-kiln")
    parser.add_argument("--sync-interval", type=float, default=0.3, help="seconds between pod syncs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    kube = KubeClient(args.kubeconfig)
    try:
        Executor(
            kube,
            node_name=args.node_name,
            root=args.root,
            kubelet_version=args.kubelet_version,
            sync_interval=args.sync_interval,
        ).run(stop)
    finally:
        kube.close()


if __name__ == "__main__":
    main()
