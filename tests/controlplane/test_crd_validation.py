"""A CRD's OpenAPI schema and CEL rules are enforced by the apiserver, with field paths."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from kiln.testing.controlplane import ControlPlane
from kiln.testing.processes import wait_until

pytestmark = pytest.mark.controlplane

GROUP = "harness.kiln.dev"
CRD_NAME = f"widgets.{GROUP}"
WIDGET_SCHEMA = {
    "type": "object",
    "properties": {
        "spec": {
            "type": "object",
            "required": ["replicas", "size"],
            "properties": {
                "replicas": {"type": "integer", "minimum": 1},
                "maxReplicas": {"type": "integer"},
                "size": {"type": "string", "enum": ["small", "large"]},
            },
            "x-kubernetes-validations": [
                {
                    "rule": "!has(self.maxReplicas) || self.replicas <= self.maxReplicas",
                    "message": "replicas must not exceed maxReplicas",
                    "fieldPath": ".replicas",
                },
            ],
        },
    },
}


@pytest.fixture(scope="module")
def widget_crd(cluster: ControlPlane) -> Iterator[str]:
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": CRD_NAME},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
            "versions": [{"name": "v1", "served": True, "storage": True, "schema": {"openAPIV3Schema": WIDGET_SCHEMA}}],
        },
    }
    cluster.kubectl("apply", "-f", "-", input=json.dumps(crd))
    cluster.kubectl("wait", "--for=condition=Established", f"crd/{CRD_NAME}", "--timeout=30s")
    # Discovery (what kubectl resolves `widget` with) lags a moment behind Established.
    wait_until(
        lambda: cluster.kubectl("get", "widgets", "-A", check=False).returncode == 0,
        timeout=30,
        what="widgets in discovery",
    )
    yield CRD_NAME
    cluster.kubectl("delete", f"crd/{CRD_NAME}", "--wait=false")


def widget(namespace: str, **spec: Any) -> str:
    return json.dumps(
        {"apiVersion": f"{GROUP}/v1", "kind": "Widget", "metadata": {"name": "w", "namespace": namespace}, "spec": spec}
    )


def test_valid_widget_is_accepted(cluster: ControlPlane, widget_crd: str, namespace: str) -> None:
    result = cluster.kubectl("apply", "-f", "-", input=widget(namespace, replicas=2, size="small"))

    assert "widget.harness.kiln.dev/w created" in result.stdout


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (
            {"replicas": 0, "size": "small"},
            "spec.replicas: Invalid value: 0: spec.replicas in body should be greater than or equal to 1",
        ),
        ({"replicas": 1, "size": "huge"}, 'spec.size: Unsupported value: "huge"'),
        (
            {"replicas": 5, "maxReplicas": 2, "size": "small"},
            'spec.replicas: Invalid value: "object": replicas must not exceed maxReplicas',
        ),
    ],
    ids=["minimum", "enum", "cel-rule"],
)
def test_schema_and_cel_violations_are_rejected_with_the_field_path(
    cluster: ControlPlane,
    widget_crd: str,
    namespace: str,
    spec: dict[str, Any],
    expected: str,
) -> None:
    result = cluster.kubectl("apply", "-f", "-", input=widget(namespace, **spec), check=False)

    assert result.returncode != 0
    assert expected in result.stderr


def test_unknown_fields_are_pruned(cluster: ControlPlane, widget_crd: str, namespace: str) -> None:
    cluster.kubectl(
        "apply", "--validate=false", "-f", "-", input=widget(namespace, replicas=1, size="large", colour="red")
    )

    stored = json.loads(cluster.kubectl("get", "widget", "w", "-n", namespace, "-o", "json").stdout)

    assert stored["spec"] == {"replicas": 1, "size": "large"}


def test_unknown_fields_are_rejected_by_strict_validation(
    cluster: ControlPlane,
    widget_crd: str,
    namespace: str,
) -> None:
    result = cluster.kubectl(
        "apply",
        "--validate=strict",
        "-f",
        "-",
        input=widget(namespace, replicas=1, size="large", colour="red"),
        check=False,
    )

    assert result.returncode != 0
    assert 'unknown field "spec.colour"' in result.stderr
