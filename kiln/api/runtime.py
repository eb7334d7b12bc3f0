"""Where and how a job runs: placement and resources, S3 connection, and the run policy.

These are the parts of a TrainingJob that describe the cluster rather than the learning problem; ExportJob
reuses StorageSpec.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from kiln.api.base import MAX_LIST, MAX_MAP, HttpUrl, KilnModel, Name, Quantity


class Toleration(KilnModel):
    key: Name | None = None
    """The taint key the toleration applies to; empty with operator Exists matches every taint."""

    operator: Literal["Exists", "Equal"] | None = None
    """Exists or Equal (the default)."""

    value: Name | None = None
    """The taint value to match, for operator Equal."""

    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    """The taint effect to match; empty matches all effects."""

    toleration_seconds: int | None = None
    """For NoExecute: how long the pod stays bound after the taint appears."""


class ResourcesSpec(KilnModel):
    nodes: Annotated[int, Field(ge=1, le=1024)] = 1
    """Number of nodes (pods). The world size is nodes x procsPerNode."""

    procs_per_node: Annotated[int, Field(ge=1, le=64)] | None = None
    """Training processes per node. Defaults to gpusPerNode, or 1 on CPU; kiln run defaults to the CPU count."""

    gpus_per_node: Annotated[int, Field(ge=0, le=64)] = 1
    """nvidia.com/gpu requested per pod. 0 trains on CPU with gloo."""

    find_unused_parameters: bool = False
    """DDP's find_unused_parameters: with more than one process, look for parameters a step left without a
    gradient, at the cost of a walk over the autograd graph every step. Off by default: every built-in network
    gives each trainable parameter a gradient on every step, the torchvision detectors too, also on a batch
    without boxes. Turn it on for a model.source network with branches a step can skip (DDP then fails with
    'Expected to have finished reduction in the prior iteration')."""

    cpu: Quantity | None = None
    """CPU request and limit per pod, as a Kubernetes quantity."""

    memory: Quantity | None = None
    """Memory request and limit per pod, as a Kubernetes quantity."""

    node_selector: Annotated[dict[str, Name], Field(max_length=MAX_MAP)] | None = None
    """Node labels the pods must match."""

    tolerations: Annotated[list[Toleration], Field(max_length=MAX_LIST)] | None = None
    """Taints the pods tolerate."""

    affinity: (
        Annotated[dict[str, Any], Field(json_schema_extra={"x-kubernetes-preserve-unknown-fields": True})] | None
    ) = None
    """A core/v1 Affinity, passed to the pods verbatim."""


class StorageSpec(KilnModel):
    endpoint_url: HttpUrl | None = None
    """S3 endpoint (http:// or https:// URL) for S3-compatible servers (MinIO, Ceph); omit for AWS."""

    region: Name | None = None
    """S3 region."""

    secret_ref: Name | None = None
    """Name of a Secret in the job's namespace with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and optionally
    AWS_SESSION_TOKEN). It reaches the pods only as environment; it is never copied anywhere else."""


class RunPolicy(KilnModel):
    suspend: bool = False
    """true stops the pods (they checkpoint on SIGTERM); false resumes from the latest checkpoint."""

    max_restarts: Annotated[int, Field(ge=0, le=1000)] = 3
    """Whole-gang restarts allowed after retriable failures."""

    retriable_exit_codes: Annotated[list[Annotated[int, Field(ge=1, le=255)]], Field(max_length=MAX_LIST)] = Field(
        default_factory=list
    )
    """Exit codes below 128 that also count as retriable (128 and above, signals, always do)."""

    active_deadline_seconds: Annotated[int, Field(ge=1)] | None = None
    """Wall-clock limit for the whole job, restarts included; then it fails with DeadlineExceeded."""

    ttl_seconds_after_finished: Annotated[int, Field(ge=0)] | None = None
    """Delete the TrainingJob and its children this long after it succeeds or fails."""

    queue_name: Name | None = None
    """Kueue LocalQueue. The Job is labelled with it and created suspended for Kueue to admit."""

    priority_class_name: Name | None = None
    """PriorityClass of the pods."""

    termination_grace_period_seconds: Annotated[int, Field(ge=1, le=86400)] = 120
    """Time between SIGTERM and SIGKILL; the trainer must checkpoint within it."""
