"""The local executor runs pods as processes the way a kubelet would run their containers."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable

import pytest

from kiln.testing.controlplane import ControlPlane
from kiln.testing.kube import JSON, namespaced
from kiln.testing.processes import free_port, wait_until

pytestmark = pytest.mark.controlplane

# Prints what the container sees as JSON: env, cwd and the files at the given (rewritten) paths.
REPORT = """
import json, os, sys
files = {path: open(path).read() for path in sys.argv[1:]}
print(json.dumps({"env": dict(os.environ), "cwd": os.getcwd(), "files": files}))
"""


def run_to_completion(cluster: ControlPlane, namespace: str, pod: JSON) -> JSON:
    cluster.kube.create(namespaced("pods", namespace), pod)
    return cluster.wait_for_pod_phase(namespace, pod["metadata"]["name"])


def test_env_config_and_secrets_reach_the_process(
    cluster: ControlPlane,
    namespace: str,
    executor_pod: Callable[..., JSON],
) -> None:
    cluster.kube.create(
        namespaced("configmaps", namespace),
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "settings"},
            "data": {"epochs": "3", "config.yaml": "lr: 0.1\n"},
        },
    )
    cluster.kube.create(
        namespaced("secrets", namespace),
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "s3"},
            "stringData": {"key": "hunter2"},
        },
    )
    pod = executor_pod(
        "report",
        ["python", "-c", REPORT, "/etc/kiln/config.yaml", "/var/secrets/key"],
        env=[
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "EPOCHS", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "epochs"}}},
            {"name": "S3_KEY", "valueFrom": {"secretKeyRef": {"name": "s3", "key": "key"}}},
            {"name": "GREETING", "value": "hello $(POD_NAME)"},
            {"name": "CONFIG", "value": "/etc/kiln/config.yaml"},
        ],
        envFrom=[{"configMapRef": {"name": "settings"}, "prefix": "CM_"}, {"secretRef": {"name": "s3"}}],
        volumeMounts=[{"name": "config", "mountPath": "/etc/kiln"}, {"name": "secrets", "mountPath": "/var/secrets"}],
        workingDir="/workspace",
    )
    pod["spec"]["volumes"] = [
        {"name": "config", "configMap": {"name": "settings"}},
        {"name": "secrets", "secret": {"secretName": "s3"}},
    ]

    finished = run_to_completion(cluster, namespace, pod)

    assert finished["status"]["phase"] == "Succeeded", cluster.pod_log(namespace, "report")
    seen = json.loads(cluster.pod_log(namespace, "report"))
    env = seen["env"]
    assert (env["POD_NAME"], env["EPOCHS"], env["S3_KEY"]) == ("report", "3", "hunter2")
    assert (env["GREETING"], env["CM_epochs"], env["key"]) == ("hello report", "3", "hunter2")
    assert env["CONFIG"].endswith("/config.yaml") and env["CONFIG"] != "/etc/kiln/config.yaml"
    assert list(seen["files"].values()) == ["lr: 0.1\n", "hunter2"]
    assert seen["cwd"].endswith("/rootfs/workspace")


def test_cluster_dns_names_of_the_subdomain_resolve_to_loopback(
    cluster: ControlPlane,
    namespace: str,
    executor_pod: Callable[..., JSON],
) -> None:
    addresses = [
        "--master-addr",
        "train-0.workers",
        "--rdzv-endpoint=train-0.workers:29500",
        f"train-1.workers.{namespace}.svc.cluster.local",
        f"store.{namespace}.svc:9000",
        "example.com",
    ]
    pod = executor_pod("dns", ["python", "-c", "import json, sys; print(json.dumps(sys.argv[1:]))"], args=addresses)
    pod["spec"] |= {"hostname": "train-0", "subdomain": "workers"}

    run_to_completion(cluster, namespace, pod)

    assert json.loads(cluster.pod_log(namespace, "dns")) == [
        "--master-addr",
        "127.0.0.1",
        "--rdzv-endpoint=127.0.0.1:29500",
        "127.0.0.1",
        "127.0.0.1:9000",
        "example.com",
    ]


def test_termination_message_and_exit_code_are_reported(
    cluster: ControlPlane,
    namespace: str,
    executor_pod: Callable[..., JSON],
) -> None:
    script = "import os, sys; open(os.environ['KILN_TERMINATION_LOG'], 'w').write('loss is nan'); sys.exit(7)"
    pod = executor_pod(
        "fails",
        ["python", "-c", script],
        env=[{"name": "KILN_TERMINATION_LOG", "value": "/tmp/kiln/termination-log"}],
        terminationMessagePath="/tmp/kiln/termination-log",
    )

    finished = run_to_completion(cluster, namespace, pod)

    terminated = finished["status"]["containerStatuses"][0]["state"]["terminated"]
    assert (finished["status"]["phase"], terminated["exitCode"]) == ("Failed", 7)
    assert terminated["message"] == "loss is nan"


def test_fallback_to_logs_on_error(
    cluster: ControlPlane,
    namespace: str,
    executor_pod: Callable[..., JSON],
) -> None:
    pod = executor_pod(
        "crashes",
        ["python", "-c", "raise SystemExit('out of memory, probably')"],
        terminationMessagePolicy="FallbackToLogsOnError",
    )

    finished = run_to_completion(cluster, namespace, pod)

    terminated = finished["status"]["containerStatuses"][0]["state"]["terminated"]
    assert (terminated["exitCode"], terminated["message"]) == (1, "out of memory, probably")


def test_deletion_sends_sigterm_then_sigkill_and_removes_the_pod(
    cluster: ControlPlane,
    namespace: str,
    executor_pod: Callable[..., JSON],
) -> None:
    stubborn = (
        "import signal, time\n"
        "signal.signal(signal.SIGTERM, lambda *_: print('SIGTERM ignored', flush=True))\n"
        "print('running', flush=True)\n"
        "while True: time.sleep(0.1)\n"
    )
    pod = executor_pod("stubborn", ["python", "-c", stubborn])
    pod["spec"]["terminationGracePeriodSeconds"] = 2
    cluster.kube.create(namespaced("pods", namespace), pod)
    cluster.wait_for_pod_phase(namespace, "stubborn", "Running")
    wait_until(lambda: "running" in cluster.pod_log(namespace, "stubborn"), timeout=30, what="the process")

    started = time.monotonic()
    cluster.kube.delete(namespaced("pods", namespace, "stubborn"))
    wait_until(
        lambda: not cluster.kube.exists(namespaced("pods", namespace, "stubborn")),
        timeout=30,
        what="the pod object to be removed",
    )

    assert time.monotonic() - started >= 2  # it sat out the grace period...
    assert "SIGTERM ignored" in cluster.pod_log_path(namespace, "stubborn", "main").read_text()


def test_missing_config_waits_then_runs_once_it_exists(
    cluster: ControlPlane, namespace: str, executor_pod: Callable[..., JSON]
) -> None:
    pod = executor_pod(
        "needs-config",
        ["python", "-c", "import os; print(os.environ['LR'])"],
        env=[{"name": "LR", "valueFrom": {"configMapKeyRef": {"name": "late", "key": "lr"}}}],
    )
    cluster.kube.create(namespaced("pods", namespace), pod)

    def waiting_reason() -> str:
        statuses = cluster.kube.get(namespaced("pods", namespace, "needs-config"))["status"].get("containerStatuses")
        return str(statuses[0]["state"].get("waiting", {}).get("reason")) if statuses else ""

    wait_until(lambda: waiting_reason() == "CreateContainerConfigError", timeout=30, what="CreateContainerConfigError")
    cluster.kube.create(
        namespaced("configmaps", namespace),
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "late"}, "data": {"lr": "0.5"}},
    )

    assert cluster.wait_for_pod_phase(namespace, "needs-config")["status"]["phase"] == "Succeeded"
    assert cluster.pod_log(namespace, "needs-config") == "0.5\n"


# What kopf's login and the operator's client do: in-cluster config first, else the kubeconfig.
WHOAMI = """
from kubernetes import client, config
try:
    config.load_incluster_config()
except config.ConfigException:
    config.load_kube_config()
review = {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}
print(client.AuthenticationV1Api().create_self_subject_review(review).status.user_info.username)
"""


def test_a_pod_talks_to_the_apiserver_as_its_service_account(
    cluster: ControlPlane,
    namespace: str,
    executor_pod: Callable[..., JSON],
) -> None:
    """The ServiceAccount admission mounts a projected token; the process authenticates with it."""
    cluster.kube.create(
        namespaced("serviceaccounts", namespace),
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "worker"}},
    )
    pod = executor_pod("whoami", ["python", "-c", WHOAMI])
    pod["spec"]["serviceAccountName"] = "worker"

    finished = run_to_completion(cluster, namespace, pod)

    log = cluster.pod_log(namespace, "whoami")
    assert finished["status"]["phase"] == "Succeeded", log
    assert log.strip() == f"system:serviceaccount:{namespace}:worker"


def test_a_pod_waits_for_a_container_port_another_process_still_holds(
    cluster: ControlPlane,
    namespace: str,
    executor_pod: Callable[..., JSON],
) -> None:
    """On the host network a previous attempt's dying process can still hold the port a new pod declares; a real
    pod has a network namespace of its own, so the executor holds the start back instead of letting it collide."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        bind = f"import socket; s = socket.socket(); s.bind(('0.0.0.0', {port})); print('bound')"
        pod = executor_pod("port-user", ["python", "-c", bind], ports=[{"containerPort": port, "protocol": "TCP"}])
        cluster.kube.create(namespaced("pods", namespace), pod)
        time.sleep(3)  # several executor syncs (0.3 s each): long enough for a start that should not happen
        waiting = cluster.kube.get(namespaced("pods", namespace, "port-user"))
        assert waiting["status"]["phase"] == "Pending", waiting["status"]
    finished = cluster.wait_for_pod_phase(namespace, "port-user")
    assert finished["status"]["phase"] == "Succeeded", cluster.pod_log(namespace, "port-user")
    assert cluster.pod_log(namespace, "port-user").strip() == "bound"


def test_a_pod_waits_for_a_port_another_jobs_live_pod_declares_before_that_pod_binds_it(
    cluster: ControlPlane,
    namespace: str,
    executor_pod: Callable[..., JSON],
) -> None:
    """A torchrun binds the rendezvous port seconds after its process starts, so a free port proves nothing while
    another Job's pod that declares it is alive: the second pod waits for the first to exit instead of taking the
    port from under it."""
    port = free_port()
    ports = [{"containerPort": port, "protocol": "TCP"}]

    def binder(name: str, delay: float, hold: float) -> JSON:
        script = f"import socket, time; time.sleep({delay}); s = socket.socket(); s.bind(('0.0.0.0', {port})); "
        script += f"s.listen(); time.sleep({hold}); print('bound')"
        pod = executor_pod(name, ["python", "-c", script], ports=ports)
        pod["metadata"]["labels"] = {"batch.kubernetes.io/job-name": name}
        return pod

    cluster.kube.create(namespaced("pods", namespace), binder("late-binder", delay=4, hold=1))
    cluster.wait_for_pod_phase(namespace, "late-binder", "Running")
    cluster.kube.create(namespaced("pods", namespace), binder("early-binder", delay=0, hold=8))
    for name in ("late-binder", "early-binder"):
        finished = cluster.wait_for_pod_phase(namespace, name)
        assert finished["status"]["phase"] == "Succeeded", cluster.pod_log(namespace, name)
        assert cluster.pod_log(namespace, name).strip() == "bound"
