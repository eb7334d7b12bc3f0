"""The generated CRDs: structural, described, current, and in step with the pydantic rules."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from kiln.api.base import RuleModel
from kiln.api.crd import KINDS, NO_STRING_NUMBER_OBJECT_OR_BOOLEAN, Kind, crd
from kiln.cli import EXIT_FAILED, app

ROOT = Path(__file__).parents[2]
# Keys a structural schema may not contain (apiextensions' structural-schema rules, plus JSON Schema-isms).
FORBIDDEN = {"$ref", "$defs", "anyOf_null", "const", "title", "prefixItems", "oneOf"}


def walk(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, node
    for name, child in node.get("properties", {}).items():
        yield from walk(child, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from walk(node["additionalProperties"], f"{path}{{}}")


def is_list_or_words(node: dict[str, Any]) -> bool:
    """classWeights' form (a list, or auto): untyped but structural, as crd._list_or_words writes it."""
    words, lists = [*node.get("anyOf", []), {}, {}][:2]
    kept_whole = node.get("x-kubernetes-preserve-unknown-fields") and "items" in node
    return bool(kept_whole) and set(words) == {"enum"} and lists == NO_STRING_NUMBER_OBJECT_OR_BOOLEAN


def root_schema(kind: Kind) -> dict[str, Any]:
    schema: dict[str, Any] = crd(kind)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.kind)
def test_schema_is_structural(kind: Kind) -> None:
    for path, node in walk(root_schema(kind)):
        assert not FORBIDDEN & node.keys(), f"{path}: {FORBIDDEN & node.keys()}"
        assert node.get("additionalProperties") is not False, path
        typed = "type" in node or node.get("x-kubernetes-int-or-string") or is_list_or_words(node)
        assert typed, f"{path} has no type"
        for bound in ("exclusiveMinimum", "exclusiveMaximum"):
            assert node.get(bound, True) is True, f"{path}.{bound} must be boolean in OpenAPI v3"
        if "anyOf" in node:
            union = node.get("x-kubernetes-int-or-string") or is_list_or_words(node)
            assert union, f"{path}: anyOf only for int-or-string, or a list or words"


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.kind)
def test_every_field_has_a_description(kind: Kind) -> None:
    spec = root_schema(kind)["properties"]
    for section in ("spec", "status"):
        for path, node in walk(spec[section], section):
            if path != section and not path.endswith(("[]", "{}")):
                assert node.get("description"), f"{kind.kind}.{path} has no description"


def test_strings_and_lists_are_bounded_for_cel_cost() -> None:
    # The apiserver estimates CEL cost from maxLength/maxItems; an unbounded string under a rule's
    # reach makes the whole CRD unacceptable.
    spec = root_schema(KINDS[0])["properties"]["spec"]
    for path, node in walk(spec, "spec"):
        if node.get("type") == "string" and "enum" not in node:
            assert "maxLength" in node, f"{path} is an unbounded string"
        if node.get("type") == "array":
            assert "maxItems" in node, f"{path} is an unbounded list"


def test_nested_objects_default_to_empty_so_the_apiserver_fills_them() -> None:
    spec = root_schema(KINDS[0])["properties"]["spec"]["properties"]
    assert spec["optimizer"]["default"] == {}
    assert spec["optimizer"]["properties"]["name"]["default"] == "adamw"
    assert spec["runPolicy"]["properties"]["maxRestarts"]["default"] == 3
    assert "default" not in spec["earlyStopping"], "earlyStopping is off unless given"


def _rule_models(model: type[RuleModel]) -> Iterator[type[RuleModel]]:
    for field in model.model_fields.values():
        annotation = field.annotation
        for candidate in getattr(annotation, "__args__", (annotation,)):
            if isinstance(candidate, type) and issubclass(candidate, RuleModel):
                yield candidate
                yield from _rule_models(candidate)


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.kind)
def test_every_python_rule_has_its_cel_twin(kind: Kind) -> None:
    text = json.dumps(root_schema(kind))
    models = {kind.spec, *_rule_models(kind.spec)}  # type: ignore[arg-type]
    rules = [rule for model in models for rule in getattr(model, "__rules__", ())]
    assert rules
    for rule in rules:
        assert json.dumps(rule.cel)[1:-1] in text, rule.cel


def test_transition_rules_guard_identity_fields() -> None:
    rules = [r["rule"] for r in root_schema(KINDS[0])["properties"]["spec"]["x-kubernetes-validations"]]
    for field in ("task", "model", "data", "resources.nodes"):
        assert f"self.{field} == oldSelf.{field}" in rules
    for field in ("checkpoint.uri", "output.uri", "image"):  # optional: setting or unsetting is a change too
        rule = f"has(self.{field}) == has(oldSelf.{field}) && (!has(self.{field}) || self.{field} == oldSelf.{field})"
        assert rule in rules
    assert not any("runPolicy" in rule and "oldSelf" in rule for rule in rules)


def test_crd_metadata() -> None:
    document = crd(KINDS[0])
    names = document["spec"]["names"]
    assert (names["shortNames"], names["categories"]) == (["tj"], ["kiln"])
    version = document["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    assert columns == ["Phase", "Task", "Model", "Epoch", "Metric", "Age"]


def test_generated_files_are_current() -> None:
    paths = ["-o", str(ROOT / "crds"), "--chart-crds", str(ROOT / "helm/kiln/crds")]
    paths += ["--docs", str(ROOT / "docs/api.md")]
    result = CliRunner().invoke(app, ["crds", "--check", *paths, "--catalogue", str(ROOT / "kiln/api/catalogue.json")])
    assert result.exit_code == 0, result.output


def test_check_detects_stale_files(tmp_path: Path) -> None:
    args = ["crds", "-o", str(tmp_path / "crds"), "--chart-crds", str(tmp_path / "chart")]
    args += ["--docs", str(tmp_path / "api.md"), "--catalogue", str(tmp_path / "catalogue.json")]
    assert CliRunner().invoke(app, args).exit_code == 0
    assert CliRunner().invoke(app, [*args, "--check"]).exit_code == 0
    for directory in ("crds", "chart"):  # the chart's copy is checked as strictly as crds/
        target = tmp_path / directory / "trainingjobs.kiln.dev.yaml"
        original = target.read_text()
        target.write_text(original.replace("Passes over the training split.", "Edited by hand."))
        result = CliRunner().invoke(app, [*args, "--check"])
        assert result.exit_code == EXIT_FAILED
        assert f"{directory}/trainingjobs.kiln.dev.yaml" in result.output
        target.write_text(original)


def test_api_docs_cover_every_spec_field() -> None:
    docs = (ROOT / "docs/api.md").read_text()
    for path, _ in walk(root_schema(KINDS[0])["properties"]["spec"], "TrainingJob.spec"):
        *parent, leaf = path.split(".")
        if len(parent) > 1 and not leaf.endswith(("[]", "{}")):
            assert f"| `{leaf}` |" in docs, path
