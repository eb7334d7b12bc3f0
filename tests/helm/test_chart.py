"""helm/kiln as the real helm renders it: lint, the values and their schema in step with the operator's settings,
the operator's Deployment, the RBAC from the shared rules file, and every optional piece against the code it
wraps. The install on a real control plane is test_chart_install.py."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import fields
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
import yaml
from chart_kit import CHART, default_values, helm, one, render

from kiln.api import contract, parse_manifest, resolve
from kiln.api.manifest import TrainingJob
from kiln.operator import labels as L
from kiln.operator.render import render_job
from kiln.operator.settings import Settings, from_env

SETTING_FIELDS = [f for f in fields(Settings) if f.name != "extra"]
RULES = CHART / "files/operator-rbac-rules.yaml"
LEADER_RULES = CHART / "files/operator-leader-election-rules.yaml"
CORE_KINDS = ["ClusterRole", "ClusterRoleBinding", "Deployment", "Role", "RoleBinding", "Service", "ServiceAccount"]


def camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def as_value(value: object) -> object:
    """A Settings value as values.yaml writes it: unset is "", a tuple is a list."""
    if value is None:
        return ""
    return list(value) if isinstance(value, tuple) else value


def operator_container(documents: list[dict[str, Any]]) -> dict[str, Any]:
    container: dict[str, Any] = one(documents, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    return container


def settings_of(documents: list[dict[str, Any]]) -> Settings:
    """What the operator would run with: its env, read by the operator's own from_env."""
    env = {variable["name"]: variable["value"] for variable in operator_container(documents)["env"]}
    return from_env(env)


def test_lint_is_clean() -> None:
    result = helm("lint", "--strict", str(CHART))
    assert "1 chart(s) linted, 0 chart(s) failed" in result.stdout, result.stdout


def test_the_chart_ships_this_kiln() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["appVersion"] == version("kiln")  # the operator image's default tag


def test_only_the_core_objects_render_by_default_and_the_crds_come_with_the_chart() -> None:
    assert sorted(document["kind"] for document in render()) == CORE_KINDS
    with_crds = helm("template", "kiln", str(CHART), "--include-crds").stdout
    crds = [d for d in yaml.safe_load_all(with_crds) if d and d["kind"] == "CustomResourceDefinition"]
    assert sorted(d["metadata"]["name"] for d in crds) == ["exportjobs.kiln.dev", "trainingjobs.kiln.dev"]


def test_every_setting_is_a_value_whose_default_is_the_operators() -> None:
    assert list(default_values()["settings"]) == [camel(f.name) for f in SETTING_FIELDS]
    assert settings_of(render()) == Settings()  # extra == {}: no KILN_OPERATOR_ variable the operator ignores


def test_every_setting_reaches_the_operator_unchanged() -> None:
    changed = Settings(
        image="registry.example/kiln-trainer@sha256:" + "a" * 64,
        storage_root="s3://team-runs",
        checkpoint_root="s3://team-checkpoints",
        endpoint_url="http://minio.minio.svc:9000",
        secret_ref="kiln-s3",
        staging_cache_claim="kiln-staging",
        namespaces=("team-a", "team-*"),
        metrics_port=9090,
        progress_interval_s=2.5,
        progress_timeout_s=0.5,
        resync_interval_s=30.0,
        run_as_user=2000,
        default_procs_per_node=4,
        workers=8,
        export_retries=1,
        source_grace_s=5.0,
        lease_duration_s=20.0,
        renew_deadline_s=12.5,
        retry_period_s=3.0,
        json_logs=True,
    )
    unchanged = [f.name for f in SETTING_FIELDS if getattr(changed, f.name) == getattr(Settings(), f.name)]
    assert not unchanged, f"give these a non-default value so the test covers them: {unchanged}"
    values = {"settings": {camel(f.name): as_value(getattr(changed, f.name)) for f in SETTING_FIELDS}}

    documents = render(values)

    assert settings_of(documents) == changed
    assert operator_container(documents)["ports"] == [{"name": "metrics", "containerPort": 9090, "protocol": "TCP"}]


def test_the_schema_knows_every_value_and_types_every_setting_as_the_operator_does() -> None:
    # helm itself validates values.yaml against the schema on every render and lint (test_lint_is_clean).
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = default_values()

    def unknown(node: dict[str, Any], value: Any, path: str) -> list[str]:
        if not isinstance(value, dict) or "properties" not in node:
            return []
        missing = [f"{path}{key}" for key in value if key not in node["properties"]]
        return missing + [
            name
            for key, child in value.items()
            if key in node["properties"]
            for name in unknown(node["properties"][key], child, f"{path}{key}.")
        ]

    assert unknown(schema, values, "") == []
    json_type = {"str": "string", "str | None": "string", "int": "integer", "float": "number", "bool": "boolean"}
    json_type["tuple[str, ...]"] = "array"
    setting_schemas = schema["properties"]["settings"]["properties"]
    assert {name: node["type"] for name, node in setting_schemas.items()} == {
        camel(f.name): json_type[str(f.type)] for f in SETTING_FIELDS
    }


@pytest.mark.parametrize(
    ("flag", "complaint"),
    [
        ("settings.metricsPort=0", "metricsPort"),
        ("settings.workerz=3", "workerz"),
        ("podSecurityContext.runAsNonRoot=false", "runAsNonRoot"),
        ("settings.jsonLogs=yes", "jsonLogs"),
        ("replicas=0", "replicas"),
        ("settings.leaseDurationS=0", "leaseDurationS"),
    ],
)
def test_helm_refuses_a_value_the_schema_forbids_and_names_it(flag: str, complaint: str) -> None:
    result = helm("template", "kiln", str(CHART), "--set", flag, check=False)
    assert result.returncode != 0
    assert complaint in result.stderr and "values don't meet the specifications of the schema" in result.stderr


def test_the_operator_deployment_is_restricted_probed_and_sized() -> None:
    documents = render()
    pod = one(documents, "Deployment")["spec"]["template"]["spec"]
    container = operator_container(documents)
    # One UID for every Kiln process: the operator image's user is the trainer's (settings.runAsUser).
    assert pod["securityContext"]["runAsUser"] == Settings().run_as_user
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    resources = container["resources"]
    assert resources["requests"].keys() == {"cpu", "memory"} and "memory" in resources["limits"]
    assert container["command"] == ["kiln", "operator"]
    assert pod["serviceAccountName"] == one(documents, "ServiceAccount")["metadata"]["name"]


def test_the_cluster_role_is_the_shared_rules_file_bound_to_the_operator() -> None:
    documents = render()
    role, binding = one(documents, "ClusterRole"), one(documents, "ClusterRoleBinding")
    assert role["rules"] == yaml.safe_load(RULES.read_text())
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    account = one(documents, "ServiceAccount")["metadata"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["name"], "namespace": "kiln-system"}]


def test_the_lease_role_is_the_leader_election_rules_file_in_the_release_namespace() -> None:
    documents = render(namespace="team-ml")
    role, binding = one(documents, "Role"), one(documents, "RoleBinding")
    assert role["rules"] == yaml.safe_load(LEADER_RULES.read_text())
    assert {rule["apiGroups"][0] for rule in role["rules"]} == {"coordination.k8s.io"}
    assert role["metadata"]["namespace"] == binding["metadata"]["namespace"] == "team-ml"
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    account = one(documents, "ServiceAccount")["metadata"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["name"], "namespace": "team-ml"}]
    cluster_rules = yaml.safe_load(RULES.read_text())
    assert not [rule for rule in cluster_rules if "coordination.k8s.io" in rule["apiGroups"]]  # never cluster-wide


def test_the_deployment_runs_two_replicas_by_default_and_as_many_as_asked() -> None:
    assert one(render(), "Deployment")["spec"]["replicas"] == 2
    assert one(render({"replicas": 3}), "Deployment")["spec"]["replicas"] == 3


def test_the_metrics_service_selects_the_operator_pod() -> None:
    documents = render()
    service = one(documents, "Service")
    pod_labels = one(documents, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"


# -- the optional pieces ------------------------------------------------------------------------------------------

EVERYTHING_ON = {
    "serviceMonitor": {"enabled": True},
    "podMonitor": {"enabled": True},
    "prometheusRule": {"enabled": True},
    "dashboards": {"enabled": True},
    "argocd": {"healthCheck": {"enabled": True}},
    "networkPolicy": {"enabled": True},
}


@pytest.fixture(scope="module")
def everything() -> list[dict[str, Any]]:
    return render(EVERYTHING_ON)


def test_lint_is_clean_with_every_optional_piece(tmp_path: Path) -> None:
    values = tmp_path / "on.yaml"
    values.write_text(yaml.safe_dump(EVERYTHING_ON))
    result = helm("lint", "--strict", str(CHART), "--values", str(values))
    assert "1 chart(s) linted, 0 chart(s) failed" in result.stdout, result.stdout


def test_an_enabled_piece_whose_file_is_missing_fails_the_render_with_its_name(tmp_path: Path) -> None:
    chart = tmp_path / "kiln"
    shutil.copytree(CHART, chart)
    (chart / "files/prometheus-rules.yaml").unlink(missing_ok=True)
    result = helm("template", "kiln", str(chart), "--set", "prometheusRule.enabled=true", check=False)
    assert result.returncode != 0 and "files/prometheus-rules.yaml" in result.stderr


def trainer_pod_template(procs_per_node: int) -> dict[str, Any]:
    """A trainer pod as the operator renders it (render_job), with several ranks per pod."""
    document = {
        "apiVersion": "kiln.dev/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {"name": "flowers", "namespace": "team-a", "uid": "uid-1", "generation": 1},
        "spec": {
            "task": "classification",
            "model": {"architecture": "resnet18"},
            "data": {"train": {"uri": "s3://data/train"}, "val": {"uri": "s3://data/val"}},
            "resources": {"nodes": 2, "gpusPerNode": procs_per_node, "procsPerNode": procs_per_node},
        },
    }
    manifest = parse_manifest(document)
    assert isinstance(manifest, TrainingJob)
    settings = Settings()
    job = render_job(resolve(manifest, settings.environment()), 1, settings)
    template: dict[str, Any] = job["spec"]["template"]
    return template


def test_the_pod_monitor_keeps_every_ranks_metrics_port_of_the_trainer_pods(everything: list[dict[str, Any]]) -> None:
    monitor = one(everything, "PodMonitor")["spec"]
    pod = trainer_pod_template(procs_per_node=3)
    assert monitor["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert monitor["selector"]["matchLabels"]["app.kubernetes.io/name"] == L.APP_NAME
    (endpoint,) = monitor["podMetricsEndpoints"]
    (keep,) = endpoint["relabelings"]
    assert keep["regex"] == contract.METRICS_PORT_NAME_PATTERN and keep["action"] == "keep"
    ports = pod["spec"]["containers"][0]["ports"]
    scraped = [port["containerPort"] for port in ports if re.fullmatch(keep["regex"], port["name"])]
    assert scraped == [contract.METRICS_PORT + rank for rank in range(3)]  # one target per rank, no rendezvous


def test_the_service_monitor_scrapes_the_metrics_service(everything: list[dict[str, Any]]) -> None:
    monitor, service = one(everything, "ServiceMonitor")["spec"], one(everything, "Service")
    assert monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert [e["port"] for e in monitor["endpoints"]] == [p["name"] for p in service["spec"]["ports"]]
    assert monitor["namespaceSelector"] == {"matchNames": ["kiln-system"]}


def test_the_network_policy_lets_the_operator_reach_each_jobs_progress(everything: list[dict[str, Any]]) -> None:
    policy = one(everything, "NetworkPolicy")["spec"]
    operator_labels = one(everything, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= operator_labels.items()
    to_trainers = [rule for rule in policy["egress"] if "to" in rule and "podSelector" in rule["to"][0]]
    (rule,) = to_trainers
    assert rule["to"][0]["podSelector"]["matchLabels"] == {L.NAME: L.APP_NAME}
    assert rule["ports"] == [{"port": contract.METRICS_PORT, "protocol": "TCP"}]
    assert policy["ingress"] == [{"ports": [{"port": "metrics", "protocol": "TCP"}]}]


def test_the_prometheus_rule_is_the_rule_file(everything: list[dict[str, Any]]) -> None:
    rule = one(everything, "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["spec"] == yaml.safe_load((CHART / "files/prometheus-rules.yaml").read_text())
    assert rule["spec"]["groups"], "a rule file without groups"


def test_each_dashboard_is_a_config_map_for_grafanas_sidecar(everything: list[dict[str, Any]]) -> None:
    dashboards = sorted((CHART / "files/dashboards").glob("*.json"))
    maps = [d for d in everything if d["kind"] == "ConfigMap" and "grafana_dashboard" in d["metadata"]["labels"]]
    assert len(maps) == len(dashboards) > 0
    for config_map in maps:
        assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
        ((key, text),) = config_map["data"].items()
        assert json.loads(text) == json.loads((CHART / "files/dashboards" / key).read_text())


def test_the_argocd_snippet_holds_the_health_check_for_both_kinds(everything: list[dict[str, Any]]) -> None:
    (snippet,) = [d for d in everything if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("argocd-health")]
    script = (CHART / "files/argocd-health.lua").read_text()
    assert snippet["data"] == {
        f"resource.customizations.health.{L.TJ_GROUP}_{kind}": script for kind in (L.TJ_KIND, L.EJ_KIND)
    }
