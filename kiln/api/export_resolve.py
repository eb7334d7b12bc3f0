"""The ResolvedExportJob: an ExportJob with its source checkpoint and output resolved, as the exporter reads it.

The operator resolves ``source.trainingJob`` + ``checkpoint`` to a URI from that TrainingJob's status (and
waits while it has none); ``kiln export`` takes a path or URI from the manifest or ``--checkpoint``. Both then
call :func:`resolve_export`, so the exporter pod and the laptop run the same resolved object
(``kiln.api.contract.EXPORT_SPEC_FILE``) and the exporter derives nothing itself.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import Field

from kiln.api.base import KilnModel, Name
from kiln.api.export import ExportJobSpec, ExportOutput, ExportSource

# Kiln's checkpoint layout: <run uri>/checkpoints/step-000001234/state.pt (kiln.trainer.checkpoint).
_STEP_FOLDER = re.compile(r"^step-\d+$")


class ResolvedExportJob(KilnModel):
    """What the exporter runs: the ExportJob's identity and its spec with source and output resolved."""

    name: Name
    """metadata.name of the ExportJob."""

    namespace: Name
    """metadata.namespace of the ExportJob ('local' for kiln export)."""

    uid: Annotated[str, Field(max_length=64)] | None = None
    """metadata.uid of the ExportJob."""

    source_training_job: Name | None = None
    """The TrainingJob named by spec.source.trainingJob before resolution, for provenance."""

    spec: ExportJobSpec
    """The spec, with source.checkpointUri and output.uri always set."""

    @property
    def checkpoint_uri(self) -> str:
        uri = self.spec.source.checkpoint_uri
        assert uri is not None  # resolve_export always sets it
        return uri

    @property
    def output_uri(self) -> str:
        uri = self.spec.output.uri
        assert uri is not None  # resolve_export always sets it
        return uri


def source_run_uri(checkpoint_uri: str) -> str:
    """The run folder a checkpoint belongs to, in Kiln's default layout (``<run>/checkpoints/step-N/state.pt``);
    for any other layout, the folder that holds the checkpoint."""
    parts = checkpoint_uri.rstrip("/").split("/")
    if parts[-1].endswith(".pt"):
        parts.pop()
    if len(parts) > 1 and _STEP_FOLDER.match(parts[-1]):
        parts.pop()
    if len(parts) > 1 and parts[-1] == "checkpoints":
        parts.pop()
    return "/".join(parts)


def resolve_export(
    name: str,
    namespace: str,
    spec: ExportJobSpec,
    *,
    checkpoint_uri: str | None = None,
    run_uri: str | None = None,
    uid: str | None = None,
) -> ResolvedExportJob:
    """``spec`` with its checkpoint and output fixed.

    ``checkpoint_uri``: the URI the operator read from the source TrainingJob's status, or ``kiln export
    --checkpoint``; it replaces spec.source. ``run_uri``: the source TrainingJob's output root when known;
    otherwise it is read off the checkpoint's path. Artifacts go to spec.output.uri, by default
    ``<run uri>/export/<name>``.
    """
    checkpoint = checkpoint_uri or spec.source.checkpoint_uri
    if checkpoint is None:
        raise ValueError("spec.source.trainingJob must be resolved to a checkpoint URI before export")
    output = spec.output.uri or "/".join([(run_uri or source_run_uri(checkpoint)).rstrip("/"), "export", name])
    resolved = ExportJobSpec.model_validate(
        {
            **spec.model_dump(by_alias=True, exclude_none=True),
            "source": ExportSource(checkpoint_uri=checkpoint, checkpoint=spec.source.checkpoint),
            "output": ExportOutput(uri=output),
        }
    )
    return ResolvedExportJob(
        name=name, namespace=namespace, uid=uid, source_training_job=spec.source.training_job, spec=resolved
    )
