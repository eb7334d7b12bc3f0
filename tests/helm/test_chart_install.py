"""helm/kiln on the real control plane: a server-side dry run of everything it renders, then install, a TrainingJob
taken to Succeeded by the operator that the chart's own Deployment runs, upgrade and uninstall.

The Deployment's pod runs on the local executor as ``kiln operator`` (the chart's command; the image is
irrelevant there), in a namespace that enforces Pod Security "restricted", with nothing but the chart's
ServiceAccount token (the executor hands it over as KUBECONFIG, kiln.testing.localpod). So the job succeeding
proves that the chart's RBAC suffices and that the shipped Deployment starts. The tests share one release and
run in file order: uninstall comes last.
"""

from __future__ import annotations

import functools
import json
import re
import textwrap
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from chart_kit import CHART, helm, values_file
from prometheus_client.parser import text_string_to_metric_families

from kiln.api import load_manifests
from kiln.api.manifest import TrainingJob
from kiln.testing.controlplane import ControlPlane
from kiln.testing.kube import ApiError, namespaced
from kiln.testing.nodes import EXECUTOR_NODE_NAME, executor_node_selector, pod_tolerations_for_executor
from kiln.testing.processes import free_port, wait_until
from kiln.testing.s3 import S3Server

pytestmark = [pytest.mark.controlplane, pytest.mark.slow, pytest.mark.timeout(420)]

RELEASE = "kiln-chart"  # not "kiln": tests/operator binds its own ServiceAccount as ClusterRole kiln-operator
OPERATOR = f"{RELEASE}-operator"
RELEASE_NAMESPACE = "kiln-chart-system"
JOBS_NAMESPACE = "kiln-chart-jobs"
SELECTOR = f"app.kubernetes.io/instance={RELEASE},app.kubernetes.io/component=operator"
PER_CLASS = {"train": 8, "val": 3}


@dataclass
class Release:
    cluster: ControlPlane
    values: Path
    metrics_port: int

    def helm(self, *args: str, check: bool = True) -> Any:
        return helm(*args, "--namespace", RELEASE_NAMESPACE, kubeconfig=self.cluster.kubeconfig, check=check)

    def operator_pods(self) -> list[dict[str, Any]]:
        pods: list[dict[str, Any]] = self.cluster.kube.get(
            namespaced("pods", RELEASE_NAMESPACE), labelSelector=SELECTOR
        )["items"]
        return [pod for pod in pods if not pod["metadata"].get("deletionTimestamp")]

    def running_operator(self) -> dict[str, Any]:
        """The one operator pod once it runs and is Ready."""
        wait_until(lambda: self._ready_pods() == 1, timeout=90, what=f"one Ready {OPERATOR} pod")
        (pod,) = self.operator_pods()
        return pod

    def _ready_pods(self) -> int:
        ready = 0
        for pod in self.operator_pods():
            conditions = pod.get("status", {}).get("conditions", [])
            ready += any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)
        return ready

    def answers(self, path: str) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}{path}", timeout=2) as response:
                return bool(response.status == 200)
        except OSError:  # not listening yet, or 503 while starting (HTTPError is an OSError)
            return False

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            return str(response.read().decode())

    def operator_log(self) -> str:
        return "\n".join(self.cluster.pod_log(RELEASE_NAMESPACE, p["metadata"]["name"]) for p in self.operator_pods())


def create_namespace(cluster: ControlPlane, name: str, labels: dict[str, str] | None = None) -> None:
    cluster.create_namespace(name, labels)


def delete_namespace(cluster: ControlPlane, name: str) -> None:
    try:
        cluster.kube.delete(f"/api/v1/namespaces/{name}")
    except ApiError as error:
        if error.status != 404:
            raise


@pytest.fixture(scope="module")
def release(cluster: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Release]:
    restricted = {f"pod-security.kubernetes.io/{mode}": "restricted" for mode in ("enforce", "warn")}
    create_namespace(cluster, RELEASE_NAMESPACE, restricted)
    create_namespace(cluster, JOBS_NAMESPACE)
    metrics_port = free_port()
    values = {
        "image": {"repository": "kiln/operator", "tag": "test"},
        "replicas": 1,  # the executor runs pods on this host: two replicas would bind the same metrics port
        "settings": {
            "image": "kiln/trainer:test",
            "metricsPort": metrics_port,  # the executor runs the pod on this host: a free port, not 8080
            "progressIntervalS": 1.0,
            "namespaces": [JOBS_NAMESPACE],  # never touch other tests' jobs
        },
        "nodeSelector": executor_node_selector(),
        "tolerations": pod_tolerations_for_executor(),
    }
    installed = Release(cluster, values_file(values, tmp_path_factory.mktemp("values")), metrics_port)
    try:
        try:
            installed.helm("install", RELEASE, str(CHART), "--values", str(installed.values), "--wait",
                           "--timeout=120s")  # fmt: skip
        except AssertionError as error:
            error.add_note(f"--- operator log\n{installed.operator_log()[-4000:]}")
            raise
        yield installed
    finally:
        installed.helm("uninstall", RELEASE, "--wait", "--timeout=60s", check=False)
        delete_namespace(cluster, JOBS_NAMESPACE)
        delete_namespace(cluster, RELEASE_NAMESPACE)


def test_everything_the_chart_renders_passes_a_server_side_dry_run(cluster: ControlPlane) -> None:
    """The API server's own validation of every object, CRDs included. The prometheus-operator kinds are left
    out: this cluster has no monitoring.coreos.com CRDs (test_chart.py checks them against the code)."""
    on = ["--set", "networkPolicy.enabled=true", "--set", "dashboards.enabled=true"]
    on += ["--set", "argocd.healthCheck.enabled=true"]
    rendered = helm("template", "kiln-dry", str(CHART), "--namespace", "default", "--include-crds", *on).stdout
    kinds = {d["kind"] for d in yaml.safe_load_all(rendered) if d}
    assert {"CustomResourceDefinition", "Deployment", "ClusterRole", "NetworkPolicy", "ConfigMap"} <= kinds

    result = cluster.kubectl("apply", "--dry-run=server", "-f", "-", input=rendered, check=False)

    assert result.returncode == 0, result.stderr
    assert "deployment.apps/kiln-dry-operator created (server dry run)" in result.stdout, result.stdout


def test_the_notes_show_a_valid_first_job_and_the_operators_name(release: Release, tmp_path: Path) -> None:
    notes = release.helm("get", "notes", RELEASE).stdout
    body = re.search(r"<<'YAML' \| kubectl apply -f -\n(.*?)\n  YAML\n", notes, re.DOTALL)
    assert body, notes
    manifest = tmp_path / "first-job.yaml"
    manifest.write_text(textwrap.dedent(body.group(1)))
    (job,) = load_manifests(manifest)  # kiln validate's checks: schema, semantics, names
    assert isinstance(job, TrainingJob)
    assert f"-n {RELEASE_NAMESPACE} rollout status deployment/{OPERATOR}" in notes
    assert f"watches TrainingJobs and ExportJobs in {JOBS_NAMESPACE}" in notes


def digits_job(s3: S3Server, bucket: str) -> dict[str, Any]:
    return {
        "apiVersion": "kiln.dev/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {"name": "digits"},
        "spec": {
            "task": "classification",
            "model": {"architecture": "debug_small"},
            "data": {
                "train": {"uri": f"s3://{bucket}/digits/train", "format": "imagefolder"},
                "val": {"uri": f"s3://{bucket}/digits/val", "format": "imagefolder"},
                "imageSize": 16,
                "batchSize": 16,
                "workers": 0,
            },
            "epochs": 1,
            "validation": {"every": 1, "metric": "accuracy"},
            "output": {"uri": f"s3://{bucket}/runs/digits"},
            "resources": {
                "nodes": 1,
                "procsPerNode": 1,
                "gpusPerNode": 0,
                "nodeSelector": executor_node_selector(),
                "tolerations": pod_tolerations_for_executor(),
            },
            "storage": {"endpointUrl": s3.endpoint_url, "region": "us-east-1", "secretRef": "s3-creds"},
            "runPolicy": {"maxRestarts": 0, "terminationGracePeriodSeconds": 10},
        },
    }


def upload_digits(s3: S3Server, bucket: str, tmp_path: Path) -> None:
    from kiln.trainer.demo import materialize

    local = materialize(tmp_path / "digits")
    for split, per_class in PER_CLASS.items():
        for folder in sorted((local / split).iterdir()):
            for image in sorted(folder.glob("*.png"))[:per_class]:
                s3.client().upload_file(str(image), bucket, f"digits/{split}/{folder.name}/{image.name}")


def test_the_charts_operator_runs_as_its_service_account_and_trains_a_job(
    release: Release, s3_server: S3Server, s3_bucket: str, tmp_path: Path
) -> None:
    cluster = release.cluster
    pod = release.running_operator()
    assert pod["spec"]["serviceAccountName"] == OPERATOR and pod["spec"]["nodeName"] == EXECUTOR_NODE_NAME
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True  # admitted under enforce=restricted
    # The executor runs no probes (it reports Ready once the process runs); the operator answers the chart's.
    container = pod["spec"]["containers"][0]
    for probe in (container["readinessProbe"], container["livenessProbe"]):
        served = probe["httpGet"]["path"]
        wait_until(functools.partial(release.answers, served), timeout=60, what=f"the operator's {served}")

    upload_digits(s3_server, s3_bucket, tmp_path)
    credentials = {key: s3_server.env[key] for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    cluster.kube.create(namespaced("secrets", JOBS_NAMESPACE),
                        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3-creds"},
                         "stringData": credentials})  # fmt: skip
    path = f"/apis/kiln.dev/v1alpha1/namespaces/{JOBS_NAMESPACE}/trainingjobs"
    cluster.kube.create(path, digits_job(s3_server, s3_bucket))

    def finished() -> bool:
        return (cluster.kube.get(f"{path}/digits").get("status") or {}).get("phase") in ("Succeeded", "Failed")

    try:
        wait_until(finished, timeout=300, what="TrainingJob digits to finish")  # ~90 s on 2 busy cores
    except TimeoutError as error:  # e.g. RBAC: the operator's log has the 403s
        error.add_note(f"--- operator log\n{release.operator_log()[-4000:]}")
        raise
    status = cluster.kube.get(f"{path}/digits")["status"]
    assert status["phase"] == "Succeeded", f"{json.dumps(status)}\n--- operator log\n{release.operator_log()[-4000:]}"
    assert status["progress"]["epoch"] == 1 and status["checkpoints"]["latest"], status
    # It was this operator: its own /metrics (on the chart's metricsPort) counted the job.
    succeeded = [
        sample.value
        for family in text_string_to_metric_families(release.metrics())
        for sample in family.samples
        if sample.name == "kiln_operator_trainingjobs_succeeded_total"
    ]
    assert sum(succeeded) == 1, succeeded


def operator_env(cluster: ControlPlane) -> dict[str, str]:
    deployment = cluster.kube.get(f"/apis/apps/v1/namespaces/{RELEASE_NAMESPACE}/deployments/{OPERATOR}")
    env = deployment["spec"]["template"]["spec"]["containers"][0]["env"]
    return {variable["name"]: variable["value"] for variable in env}


def json_lines(log: str) -> list[dict[str, Any]]:
    lines = []
    for line in log.splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:
            continue
    return lines


def test_an_upgrade_with_a_changed_value_reaches_the_running_operator(release: Release) -> None:
    before = release.running_operator()
    assert "KILN_OPERATOR_JSON_LOGS" in operator_env(release.cluster) and not json_lines(release.operator_log())

    release.helm("upgrade", RELEASE, str(CHART), "--reuse-values", "--set", "settings.jsonLogs=true", "--wait",
                 "--timeout=120s")  # fmt: skip

    assert operator_env(release.cluster)["KILN_OPERATOR_JSON_LOGS"] == "true"
    after = release.running_operator()
    assert after["metadata"]["uid"] != before["metadata"]["uid"]  # Recreate: the old operator is gone
    wait_until(lambda: any(line.get("message", "").startswith("kiln operator ready")
                           for line in json_lines(release.operator_log())),
               timeout=60, what="the upgraded operator to log JSON")  # fmt: skip
    history = json.loads(release.helm("history", RELEASE, "--output", "json").stdout)
    assert [(entry["revision"], entry["status"]) for entry in history] == [(1, "superseded"), (2, "deployed")]


def test_uninstall_removes_the_operator_and_keeps_the_crds(release: Release) -> None:
    cluster = release.cluster
    release.helm("uninstall", RELEASE, "--wait", "--timeout=60s")

    rbac = "/apis/rbac.authorization.k8s.io/v1"
    for path in (f"/apis/apps/v1/namespaces/{RELEASE_NAMESPACE}/deployments/{OPERATOR}",
                 namespaced("serviceaccounts", RELEASE_NAMESPACE, OPERATOR),
                 namespaced("services", RELEASE_NAMESPACE, f"{OPERATOR}-metrics"),
                 f"{rbac}/clusterroles/{OPERATOR}", f"{rbac}/clusterrolebindings/{OPERATOR}"):  # fmt: skip
        assert not cluster.kube.exists(path), f"{path} survived helm uninstall"
    wait_until(lambda: not release.operator_pods(), timeout=60, what="the operator pod to go")
    # Helm never deletes CRDs (that would delete every TrainingJob with them).
    assert cluster.kube.exists("/apis/apiextensions.k8s.io/v1/customresourcedefinitions/trainingjobs.kiln.dev")
