"""Generate the CustomResourceDefinitions from the pydantic models.

pydantic emits JSON Schema 2020-12; the apiserver wants a *structural* OpenAPI v3 schema: every node typed,
no $ref, no anyOf-with-null, boolean exclusiveMinimum, no additionalProperties: false (unknown fields are
pruned by the apiserver and refused by our own validation instead).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import yaml
from pydantic import BaseModel

from kiln.api.base import GROUP, VERSION
from kiln.api.export import ExportJobSpec
from kiln.api.manifest import JOB_NAME_PATTERN, MAX_JOB_NAME
from kiln.api.status import ExportJobStatus, TrainingJobStatus
from kiln.api.training import TrainingJobSpec

Schema = dict[str, Any]


@dataclass(frozen=True)
class Kind:
    kind: str
    plural: str
    short_name: str
    spec: type[BaseModel]
    status: type[BaseModel]
    description: str
    printer_columns: tuple[Schema, ...]

    @property
    def crd_name(self) -> str:
        return f"{self.plural}.{GROUP}"


def _column(name: str, path: str, type_: str = "string", priority: int = 0) -> Schema:
    column: Schema = {"name": name, "type": type_, "jsonPath": path}
    if priority:
        column["priority"] = priority
    return column


AGE = _column("Age", ".metadata.creationTimestamp", "date")

KINDS = (
    Kind(
        kind="TrainingJob",
        plural="trainingjobs",
        short_name="tj",
        spec=TrainingJobSpec,
        status=TrainingJobStatus,
        description="A distributed training run of a computer-vision model, executed as torchrun pods.",
        printer_columns=(
            _column("Phase", ".status.phase"),
            _column("Task", ".spec.task"),
            _column("Model", ".spec.model.architecture"),
            _column("Epoch", ".status.progress.epoch", "integer"),
            _column("Metric", ".status.progress.metric"),
            AGE,
        ),
    ),
    Kind(
        kind="ExportJob",
        plural="exportjobs",
        short_name="ej",
        spec=ExportJobSpec,
        status=ExportJobStatus,
        description="Exports a TrainingJob checkpoint to ONNX, TorchScript or torch.export, verified and benchmarked.",
        printer_columns=(
            _column("Phase", ".status.phase"),
            _column("Source", ".spec.source.trainingJob"),
            _column("Checkpoint", ".spec.source.checkpoint"),
            _column("Formats", ".spec.formats"),
            _column("Verified", ".status.verified", "boolean"),
            _column("Source-URI", ".status.sourceCheckpoint", priority=1),
            _column("Reason", '.status.conditions[?(@.type=="Failed")].reason', priority=1),
            AGE,
        ),
    ),
)


def _clean(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


# A structural schema names no type inside anyOf, and JSON Schema's other keywords pass any value of a type they
# do not constrain. So the list branch of "a list, or one of these words" refuses every other JSON type with
# bounds that no value of that type meets.
NO_STRING_NUMBER_OBJECT_OR_BOOLEAN: Schema = {
    "minLength": 1,
    "maxLength": 0,
    "minimum": 1,
    "maximum": 0,
    "minProperties": 1,
    "maxProperties": 0,
    "not": {"enum": [True, False]},
}


def _list_or_words(members: list[Schema], defs: dict[str, Schema]) -> Schema | None:
    """``list[X] | Literal[...]`` (classWeights: a list, or auto) as the structural form the apiserver accepts:
    untyped, so kept whole (x-kubernetes-preserve-unknown-fields), the list's items and bounds outside anyOf,
    and anyOf [the words, a list]. None for any other union."""
    lists = [member for member in members if member.get("type") == "array"]
    keywords = [member for member in members if member.get("type") == "string" and {"enum", "const"} & member.keys()]
    if len(lists) != 1 or not keywords or len(members) != 1 + len(keywords):
        return None
    words = [word for member in keywords for word in member.get("enum", [member.get("const")])]
    outside = {key: value for key, value in to_structural(lists[0], defs).items() if key != "type"}
    return {
        "x-kubernetes-preserve-unknown-fields": True,
        **outside,
        "anyOf": [{"enum": words}, NO_STRING_NUMBER_OBJECT_OR_BOOLEAN],
    }


def to_structural(node: Schema, defs: dict[str, Schema]) -> Schema:
    """Rewrite one pydantic JSON-schema node (and everything under it) into structural OpenAPI v3."""
    node = dict(node)
    if "anyOf" in node:
        members = [m for m in node.pop("anyOf") if m.get("type") != "null"]
        if {m.get("type") for m in members} == {"integer", "string"}:
            node["x-kubernetes-int-or-string"] = True
        elif len(members) == 1:
            node = {**members[0], **node}
        else:
            node["oneOf"] = members
    if "oneOf" in node:  # a union pydantic tags (with a Discriminator), or one left from anyOf above
        members = node.pop("oneOf")
        union = _list_or_words(members, defs)
        if union is None:
            raise ValueError(f"union {members} has no structural form")
        return {**to_structural(node, defs), **union}
    while "$ref" in node or "allOf" in node:
        ref = node.pop("$ref", None) or node.pop("allOf")[0]["$ref"]
        node = {**defs[ref.split("/")[-1]], **node}
    out: Schema = {}
    for key, value in node.items():
        if key in {"title", "const", "discriminator", "$defs"}:
            continue
        if key == "description":
            out[key] = _clean(value)
        elif key == "properties":
            out[key] = {name: to_structural(prop, defs) for name, prop in value.items()}
        elif key == "items":
            out[key] = to_structural(value, defs)
        elif key == "additionalProperties":
            if isinstance(value, dict) and value:
                out[key] = to_structural(value, defs)
        elif key in {"exclusiveMinimum", "exclusiveMaximum"}:
            bound = "minimum" if key == "exclusiveMinimum" else "maximum"
            out[bound], out[key] = value, True
        elif key == "default" and value is None:
            continue
        else:
            out[key] = value
    if out.get("x-kubernetes-preserve-unknown-fields"):
        out.setdefault("type", "object")
    if "x-kubernetes-int-or-string" in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    return out


def openapi_schema(model: type[BaseModel]) -> Schema:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    return to_structural(raw, raw.get("$defs", {}))


def crd(kind: Kind) -> Schema:
    name_rule = f"self.metadata.name.size() <= {MAX_JOB_NAME} && self.metadata.name.matches('{JOB_NAME_PATTERN}')"
    root: Schema = {
        "type": "object",
        "description": kind.description,
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": "The API version: kiln.dev/v1alpha1."},
            "kind": {"type": "string", "description": f"The kind: {kind.kind}."},
            "metadata": {"type": "object"},
            "spec": {**openapi_schema(kind.spec), "description": f"What the {kind.kind} should do."},
            "status": {**openapi_schema(kind.status), "description": "Observed state, written by the operator."},
        },
        "x-kubernetes-validations": [
            {
                "rule": name_rule,
                # No fieldPath: the schema leaves metadata untyped, so the apiserver cannot resolve one.
                "message": f"metadata.name must be a DNS-1035 label of at most {MAX_JOB_NAME} characters",
            }
        ],
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": kind.crd_name},
        "spec": {
            "group": GROUP,
            "names": {
                "kind": kind.kind,
                "listKind": f"{kind.kind}List",
                "plural": kind.plural,
                "singular": kind.kind.lower(),
                "shortNames": [kind.short_name],
                "categories": ["kiln"],
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": list(kind.printer_columns),
                    "schema": {"openAPIV3Schema": root},
                }
            ],
        },
    }


class _NoAliasDumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:
        return True


def to_yaml(document: Schema) -> str:
    return yaml.dump(document, Dumper=_NoAliasDumper, sort_keys=False, width=120)
