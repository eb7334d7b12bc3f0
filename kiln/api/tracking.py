"""TrainingJob.spec.tracking: experiment tracking beyond the run's own outputs.

TensorBoard needs no setting: rank 0 always writes event files under ``output.uri``/tensorboard. An MLflow
tracking server is optional; its credentials reach the pods only as environment from a Secret
(``credentialsSecret``), never through the spec, the ConfigMap or the status.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from kiln.api.base import MAX_URI, KilnModel, Name, Pattern

MLFLOW_URI = Pattern(
    # An http(s) URL whose authority holds no user:password@: credentials belong in credentialsSecret.
    alternatives=("^https?://[^/ @]+(/[^ ]*)?$",),
    message="must be an http:// or https:// URL without user:password@ (credentials go in credentialsSecret)",
)
MlflowUri = Annotated[str, Field(min_length=1, max_length=MAX_URI), *MLFLOW_URI.annotations()]

MLFLOW_CREDENTIAL_KEYS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
"""The Secret keys (and environment variables) the MLflow client authenticates with: basic auth from the first
two, or a bearer token from the third."""


class MlflowSpec(KilnModel):
    uri: MlflowUri
    """The MLflow tracking server, for example https://mlflow.example.com. A run that cannot reach it trains on
    with a warning."""

    experiment: Name | None = None
    """The experiment the run is logged in, created when missing. Defaults to the TrainingJob's namespace."""

    run_name: Name | None = None
    """The MLflow run's name. Defaults to the TrainingJob's name. Restarts and resumes continue the same run."""

    credentials_secret: Name | None = None
    """A Secret in the job's namespace with MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or
    MLFLOW_TRACKING_TOKEN. Its keys reach the trainer pods only as environment variables; kiln run reads the
    same variables from its own environment."""


class TrackingSpec(KilnModel):
    mlflow: MlflowSpec | None = None
    """Log parameters, metrics per step and per epoch, and the best checkpoint to an MLflow tracking server,
    tagged with the TrainingJob's namespace, name and uid. Off when omitted."""


def resolve_tracking(tracking: TrackingSpec, namespace: str, name: str) -> TrackingSpec:
    """The MLflow experiment and run name filled in: the namespace and the job's name."""
    if tracking.mlflow is None:
        return tracking
    mlflow = tracking.mlflow.model_copy(
        update={"experiment": tracking.mlflow.experiment or namespace, "run_name": tracking.mlflow.run_name or name}
    )
    return tracking.model_copy(update={"mlflow": mlflow})
