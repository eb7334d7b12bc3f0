"""The Kiln API: pydantic models that are the single source of truth for CRDs, docs and validation.

Torch-free and kopf-free: the CLI, the operator and the trainer all import it.
"""

from kiln.api.base import API_VERSION, GROUP, VERSION
from kiln.api.export import ExportJobSpec
from kiln.api.manifest import ExportJob, InvalidManifest, Manifest, ManifestError, TrainingJob
from kiln.api.parse import load_manifests, load_training_job, parse_manifest
from kiln.api.resolve import Environment, ResolvedTrainingJob, resolve
from kiln.api.status import Condition, ConditionType, ExportJobStatus, Phase, Reason, TrainingJobStatus
from kiln.api.training import TrainingJobSpec

__all__ = [
    "API_VERSION",
    "GROUP",
    "VERSION",
    "Condition",
    "ConditionType",
    "Environment",
    "ExportJob",
    "ExportJobSpec",
    "ExportJobStatus",
    "InvalidManifest",
    "Manifest",
    "ManifestError",
    "Phase",
    "Reason",
    "ResolvedTrainingJob",
    "TrainingJob",
    "TrainingJobSpec",
    "TrainingJobStatus",
    "load_manifests",
    "load_training_job",
    "parse_manifest",
    "resolve",
]
