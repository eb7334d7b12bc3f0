"""Whole Kubernetes objects (apiVersion, kind, metadata, spec, status) and the errors that name their fields.

Every way a manifest can be wrong ends as a ``ManifestError``: one line naming the file, the field path
and the reason. The CLI prints them and exits 2; the operator puts the same text in a Failed condition.
Parsing and loading manifests (schema, then semantic rules) lives in :mod:`kiln.api.parse`, above both this
module and :mod:`kiln.api.semantics`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

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
