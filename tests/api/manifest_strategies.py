"""Hypothesis strategies that generate TrainingJob and ExportJob manifests from the models themselves.

The leaves come from the generated CRD schema (so a new field is generated as soon as it exists): each
scalar or list-of-scalars field gets values inside its bounds, values just outside them, wrong types, and
for checked strings (URIs, URLs) samples of both kinds. A manifest is a valid base with a few leaves set to
valid values and, sometimes, one leaf mutated to something invalid.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st

from kiln.api.crd import KINDS, Kind, crd
from tests.api.test_validate_cli import VALID

Node = dict[str, Any]

TRAINING_BASE = VALID  # the CLI tests' valid TrainingJob (an odd batchSize, so mixup mutations bite)
EXPORT_BASE: dict[str, Any] = {
    "apiVersion": "kiln.dev/v1alpha1",
    "kind": "ExportJob",
    "metadata": {"name": "digits-export"},
    "spec": {"source": {"trainingJob": "digits"}},
}
BASES = {"TrainingJob": TRAINING_BASE, "ExportJob": EXPORT_BASE}

STORAGE_URIS = [
    "s3://bucket/prefix", "s3://my.bucket-1/a/b.pt", "/data/train", "./relative", "data/train", "file:///abs/x",
    "ftp://host/x", "http://host/x", "s3://B/x", "s3://ab", "file://relative", "gs://bucket/x", "auto", "never",
]  # fmt: skip
HTTP_URLS = ["http://minio:9000", "https://s3.example.com/path", "not a url", "minio:9000", "ftp://x", "http://"]
NAMES = ["resnet18", "adamw", "sgd", "adamx", "accuracy", "loss", "cross_entropy", "debug", "team-queue", "x" * 253]


@dataclass(frozen=True)
class Leaf:
    path: tuple[str, ...]
    node: Node

    @property
    def dotted(self) -> str:
        return ".".join(self.path)


def leaves(kind: Kind) -> list[Leaf]:
    spec = crd(kind)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    found: list[Leaf] = []

    def walk(node: Node, path: tuple[str, ...]) -> None:
        if node.get("type") == "object" and "properties" in node:
            for name, child in node["properties"].items():
                walk(child, (*path, name))
            return
        if node.get("x-kubernetes-preserve-unknown-fields"):
            return  # free-form (affinity): passed through verbatim by both
        items = node.get("items", {})
        if node.get("type") == "array" and items.get("type") == "object":
            return  # lists of objects (transforms, tolerations) are covered by their own tests
        found.append(Leaf(path, node))

    walk(spec, ("spec",))
    return found


def _bounds(node: Node) -> tuple[float | None, float | None]:
    return node.get("minimum"), node.get("maximum")


def valid_value(node: Node) -> st.SearchStrategy[Any]:
    kind = node.get("type")
    if node.get("x-kubernetes-int-or-string"):
        return st.sampled_from([2, "500m", "4Gi", "16"])
    if "enum" in node:
        return st.sampled_from(node["enum"])
    if kind == "boolean":
        return st.booleans()
    if kind == "integer":
        low, high = _bounds(node)
        low = int(low) if low is not None else -5
        return st.integers(min_value=low, max_value=int(min(high if high is not None else low + 10**6, low + 10**6)))
    if kind == "number":
        low, high = _bounds(node)
        return st.floats(
            min_value=low,
            max_value=high if high is not None else (low or 0) + 1000,
            exclude_min=bool(node.get("exclusiveMinimum")) and low is not None,
            exclude_max=bool(node.get("exclusiveMaximum")) and high is not None,
            allow_nan=False,
            allow_infinity=False,
        )
    if kind == "string":
        rules = " ".join(rule["rule"] for rule in node.get("x-kubernetes-validations", []))
        if "s3://" in rules:
            return st.sampled_from(STORAGE_URIS)
        if "https?" in rules:
            return st.sampled_from(HTTP_URLS)
        return st.sampled_from([name[: node.get("maxLength", 253)] for name in NAMES])
    if kind == "array":
        return st.lists(valid_value(node["items"]), min_size=node.get("minItems", 0), max_size=node.get("maxItems", 4))
    if kind == "object" and isinstance(node.get("additionalProperties"), dict):
        return st.dictionaries(
            st.sampled_from(["cross_entropy", "dice", "gpu", "zone"]),
            valid_value(node["additionalProperties"]),
            max_size=3,
        )
    raise AssertionError(f"no generator for {node}")


def invalid_value(node: Node) -> st.SearchStrategy[Any]:
    kind = node.get("type")
    low, high = _bounds(node)
    wrong_type: list[Any] = [{"nested": 1}]
    if node.get("x-kubernetes-int-or-string"):
        return st.sampled_from([1.5, True, [1]])
    if "enum" in node:
        return st.sampled_from(["bogus", node["enum"][0].upper(), 3])
    if kind == "boolean":
        return st.sampled_from(["true", 1, "yes", *wrong_type])
    if kind in ("integer", "number"):
        outside: list[Any] = ["7", *wrong_type]
        if low is not None:
            outside.append(low if node.get("exclusiveMinimum") else low - 1)
        if high is not None:
            outside.append(high if node.get("exclusiveMaximum") else high + 1)
        if kind == "integer":
            outside.append(2.5)
        return st.sampled_from(outside)
    if kind == "string":
        too_long = "x" * (node.get("maxLength", 10**4) + 1)
        return st.sampled_from([5, True, too_long, *([""] if node.get("minLength") else []), *wrong_type])
    if kind == "array":
        too_many = [valid_example(node["items"])] * (node.get("maxItems", 64) + 1)
        return st.one_of(
            st.sampled_from(["not-a-list", too_many]),
            st.lists(invalid_value(node["items"]), min_size=1, max_size=2),
        )
    return st.sampled_from(["not-an-object", 7, ["x"]])


def valid_example(node: Node) -> Any:
    """One fixed in-bounds value of a scalar node (to build lists that are too long)."""
    if "enum" in node:
        return node["enum"][0]
    return {"boolean": True, "string": "x"}.get(node.get("type", ""), node.get("maximum") or 1)


def _set(document: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    target = document
    for key in path[:-1]:
        child = target.get(key)
        if not isinstance(child, dict):
            child = target[key] = {}
        target = child
    target[path[-1]] = value


@st.composite
def manifests(draw: st.DrawFn, kind: Kind) -> tuple[dict[str, Any], str]:
    """(document, what was changed) for one kind."""
    fields = leaves(kind)
    document = copy.deepcopy(BASES[kind.kind])
    changes = []
    for leaf in draw(st.lists(st.sampled_from(fields), max_size=5, unique_by=lambda leaf: leaf.path)):
        value = draw(valid_value(leaf.node))
        _set(document, leaf.path, value)
        changes.append(f"{leaf.dotted}={value!r:.60}")
    if draw(st.booleans()):
        leaf = draw(st.sampled_from(fields))
        value = draw(invalid_value(leaf.node))
        _set(document, leaf.path, value)
        changes.append(f"MUTATED {leaf.dotted}={value!r:.60}")
    return document, "; ".join(changes)


def any_manifest() -> st.SearchStrategy[tuple[dict[str, Any], str]]:
    return st.one_of(*(manifests(kind) for kind in KINDS))
