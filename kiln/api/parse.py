"""Parsing manifests: a decoded document or a YAML file into TrainingJob/ExportJob objects, or InvalidManifest.

``parse_manifest`` is the one way in: it checks the schema (the models of :mod:`kiln.api.manifest`) and then
the semantic rules (:mod:`kiln.api.semantics`), so no entry point (CLI, ``kiln run``, operator) can skip the
latter. This module sits above both; neither imports it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from kiln.api.manifest import KINDS, ExportJob, InvalidManifest, Manifest, ManifestError, TrainingJob, field_path
from kiln.api.semantics import semantic_errors


def _errors_from(exc: ValidationError, source: str) -> list[ManifestError]:
    errors = []
    for error in exc.errors(include_url=False):
        loc = [part for part in error["loc"] if not _is_union_tag(part)]
        ctx = error.get("ctx") or {}
        if error["type"] == "kiln_rule" and ctx.get("field"):
            loc.extend(str(ctx["field"]).split("."))
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown field"
        errors.append(ManifestError(source, field_path(loc), message))
    return errors


def _is_union_tag(part: int | str) -> bool:
    # pydantic inserts the member type's name into paths through `X | None` unions, e.g. 'function-after[...]'.
    return isinstance(part, str) and ("[" in part or part in {"int", "str"})


def parse_manifest(document: Any, source: str = "") -> Manifest:
    """Validate one decoded YAML/JSON document into a TrainingJob or ExportJob: schema, then semantic rules."""
    if not isinstance(document, dict):
        raise InvalidManifest([ManifestError(source, "", "expected a mapping with apiVersion, kind and spec")])
    kind = document.get("kind")
    model = KINDS.get(kind) if isinstance(kind, str) else None
    if model is None:
        expected = " or ".join(KINDS)
        raise InvalidManifest([ManifestError(source, "kind", f"expected {expected}, got {kind!r}")])
    try:
        manifest = model.model_validate(document)
    except ValidationError as exc:
        raise InvalidManifest(_errors_from(exc, source)) from None
    # Semantic rules run here, behind every entry point (CLI, kiln run, operator), so none can skip them.
    errors = semantic_errors(manifest, source)
    if errors:
        raise InvalidManifest(errors)
    return manifest


class KubeYamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader, reading numbers as kubectl does.

    PyYAML follows YAML 1.1, where ``1e-3`` (no dot) is a string; kubectl's Go YAML reads it as a float.
    Models are strict, so without this a learning rate the apiserver accepts would be refused here.
    """


KubeYamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def iter_documents(path: Path) -> Iterator[tuple[str, Any]]:
    """(source label, decoded document) for each non-empty YAML document in a file."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise InvalidManifest([ManifestError(str(path), "", f"cannot read file: {exc.strerror}")]) from None
    try:
        documents = [doc for doc in yaml.load_all(text, Loader=KubeYamlLoader) if doc is not None]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise InvalidManifest([ManifestError(str(path), "", f"invalid YAML{where}: {problem}")]) from None
    if not documents:
        raise InvalidManifest([ManifestError(str(path), "", "no YAML documents in file")])
    for index, document in enumerate(documents):
        yield (str(path) if len(documents) == 1 else f"{path}#{index}"), document


def load_manifests(path: Path) -> list[Manifest]:
    """Every manifest in a file, or InvalidManifest with all of their errors."""
    manifests, errors = [], []
    for source, document in iter_documents(path):
        try:
            manifests.append(parse_manifest(document, source))
        except InvalidManifest as exc:
            errors.extend(exc.errors)
    if errors:
        raise InvalidManifest(errors)
    return manifests


def load_training_job(path: Path) -> TrainingJob:
    """The single TrainingJob a file holds (what `kiln run` takes)."""
    manifests = load_manifests(path)
    jobs = [m for m in manifests if isinstance(m, TrainingJob)]
    if len(jobs) != 1 or len(manifests) != 1:
        raise InvalidManifest([ManifestError(str(path), "kind", "expected exactly one TrainingJob in the file")])
    return jobs[0]


def load_export_job(path: Path) -> ExportJob:
    """The single ExportJob a file holds (what ``kiln export`` takes)."""
    manifests = load_manifests(path)
    jobs = [m for m in manifests if isinstance(m, ExportJob)]
    if len(jobs) != 1 or len(manifests) != 1:
        raise InvalidManifest([ManifestError(str(path), "kind", "expected exactly one ExportJob in the file")])
    return jobs[0]
