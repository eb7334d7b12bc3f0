"""`kiln validate` and the real kube-apiserver agree on what a manifest is, found by generated manifests.

For every generated TrainingJob or ExportJob (valid ones, and ones with one field mutated out of its
bounds, into the wrong type, or into a bad URI):
  1. the apiserver (the committed CRDs, server-side dry run, strict field validation) accepts it exactly
     when Kiln's models (schema plus the CEL-twinned rules) accept it;
  2. `kiln validate` accepts only what the apiserver accepts: its extra, semantic checks (names from the
     catalogue, cross-field orderings) may refuse more, never less;
  3. `kiln validate` answers with exit 0 or 2 and one line per problem, never a traceback.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from pydantic import ValidationError
from typer.testing import CliRunner

from kiln.api.manifest import KINDS as MODELS
from kiln.api.parse import InvalidManifest, parse_manifest
from kiln.cli import EXIT_INVALID, EXIT_OK, app
from kiln.testing.controlplane import ControlPlane
from kiln.testing.kube import ApiError
from tests.api.manifest_strategies import any_manifest

pytestmark = pytest.mark.controlplane

PLURALS = {"TrainingJob": "trainingjobs", "ExportJob": "exportjobs"}


def apiserver_verdict(cluster: ControlPlane, namespace: str, document: dict[str, Any]) -> tuple[bool, str]:
    path = f"/apis/kiln.dev/v1alpha1/namespaces/{namespace}/{PLURALS[document['kind']]}"
    try:
        cluster.kube.request("POST", path, document, params={"dryRun": "All", "fieldValidation": "Strict"})
    except ApiError as error:
        if error.status not in (400, 422):
            raise
        return False, str(error.body.get("message", error))
    return True, ""


def models_verdict(document: dict[str, Any]) -> tuple[bool, str]:
    try:
        MODELS[document["kind"]].model_validate(document)
    except ValidationError as error:
        return False, str(error)
    return True, ""


def kiln_verdict(document: dict[str, Any]) -> tuple[bool, str]:
    try:
        parse_manifest(document)
    except InvalidManifest as error:
        return False, str(error)
    return True, ""


@pytest.fixture(scope="module")
def agreement_namespace(cluster: ControlPlane, kiln_crds: None) -> str:
    name = "kiln-agreement"
    try:
        cluster.kube.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    except ApiError as error:
        if error.status != 409:
            raise
    return name


@settings(
    max_examples=300,
    deadline=None,
    derandomize=True,  # the same manifests in every CI run; widen locally with --hypothesis-seed
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=any_manifest())
def test_kiln_and_the_apiserver_agree(
    cluster: ControlPlane, agreement_namespace: str, tmp_path_factory: pytest.TempPathFactory, case: Any
) -> None:
    document, changes = case
    server_ok, server_says = apiserver_verdict(cluster, agreement_namespace, document)
    models_ok, models_say = models_verdict(document)
    assert server_ok == models_ok, (
        f"disagreement on {changes}\napiserver: {server_ok} {server_says}\nmodels: {models_ok} {models_say}"
    )
    kiln_ok, kiln_says = kiln_verdict(document)
    assert server_ok or not kiln_ok, f"kiln validate accepted what the apiserver refused: {changes}\n{server_says}"

    path = tmp_path_factory.mktemp("manifest") / "job.yaml"
    path.write_text(yaml.safe_dump(json.loads(json.dumps(document))))
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == (EXIT_OK if kiln_ok else EXIT_INVALID), (changes, result.output, kiln_says)
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    if not kiln_ok:
        for line in result.output.strip().splitlines():
            assert line.startswith(f"error {Path(path)}"), line
