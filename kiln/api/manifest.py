"""Whole Kubernetes objects (apiVersion, kind, metadata, spec, status) and loading them from YAML files.

Every way a manifest can be wrong ends as a ``ManifestError``: one line naming the file, the field path
and the reason. The CLI prints them and exits 2; the operator puts the same text in a Failed condition.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from kiln.api.base import API_VERSION
from kiln.api.export import ExportJobSpec
from kiln.api.status import ExportJobStatus, TrainingJobStatus
from kiln.api.training import TrainingJobSpec

# Children are named <job>-<suffix> and pods get <job>-<attempt>-<index> hostnames, which must stay
# DNS-1035 labels of at most 63 characters.
MAX_JOB_NAME = 40
JOB_NAME_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"


class ObjectMeta(BaseModel):
    """The parts of metav1.ObjectMeta Kiln reads; the apiserver's own fields pass through untouched."""

    model_config = ConfigDict(extra="allow", frozen=True)

    name: Annotated[str, Field(max_length=MAX_JOB_NAME, pattern=JOB_NAME_PATTERN)]
    namespace: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    uid: str | None = None
    generation: int | None = None


class _Object(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    api_version: Annotated[str, Field(alias="apiVersion")]
    metadata: ObjectMeta

    @field_validator("api_version")
    @classmethod
    def _known_version(cls, value: str) -> str:
        if value != API_VERSION:
            raise ValueError(f"expected {API_VERSION}, got {value!r}")
        return value


class TrainingJob(_Object):
    kind: Literal["TrainingJob"] = "TrainingJob"
    spec: TrainingJobSpec
    status: TrainingJobStatus | None = None


class ExportJob(_Object):
    kind: Literal["ExportJob"] = "ExportJob"
    spec: ExportJobSpec
    status: ExportJobStatus | None = None


KINDS: dict[str, type[TrainingJob] | type[ExportJob]] = {"TrainingJob": TrainingJob, "ExportJob": ExportJob}
Manifest = TrainingJob | ExportJob


@dataclass(frozen=True)
class ManifestError(Exception):
    """One problem with one field of one manifest."""

    source: str
    field: str
    reason: str

    def __str__(self) -> str:
        where = f"{self.source}: " if self.source else ""
        return f"{where}{self.field}: {self.reason}" if self.field else f"{where}{self.reason}"


class InvalidManifest(Exception):
    def __init__(self, errors: list[ManifestError]):
        super().__init__("\n".join(map(str, errors)))
        self.errors = errors


def field_path(loc: Iterable[int | str]) -> str:
    """('spec', 'augmentation', 'transforms', 0, 'name') -> 'spec.augmentation.transforms[0].name'."""
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


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
    from kiln.api.semantics import semantic_errors  # semantics reads the models defined in this module

    errors = semantic_errors(manifest, source)
    if errors:
        raise InvalidManifest(errors)
    return manifest


def iter_documents(path: Path) -> Iterator[tuple[str, Any]]:
    """(source label, decoded document) for each non-empty YAML document in a file."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise InvalidManifest([ManifestError(str(path), "", f"cannot read file: {exc.strerror}")]) from None
    try:
        documents = [doc for doc in yaml.safe_load_all(text) if doc is not None]
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
