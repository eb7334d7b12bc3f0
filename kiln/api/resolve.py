"""Defaults, resolved in one place.

A ``ResolvedTrainingJob`` is the spec with every derivable blank filled in: metric names and modes per task,
output and checkpoint URIs, processes per node, the image. The operator renders children from it, ships it
to the pods in a ConfigMap, and the trainer reads it back without deriving anything again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Annotated, Any, Literal

from pydantic import Field

from kiln.api.base import KilnModel, Name, Uri
from kiln.api.contract import DEFAULT_TRAINER_IMAGE
from kiln.api.data import Staging
from kiln.api.learning import LossKeyframe, MetricMode
from kiln.api.manifest import InvalidManifest, ManifestError, TrainingJob
from kiln.api.parse import parse_manifest
from kiln.api.tracking import resolve_tracking
from kiln.api.training import TrainingJobSpec


@dataclass(frozen=True)
class TaskDefaults:
    metric: str
    loss: dict[str, float]


TASK_DEFAULTS: dict[str, TaskDefaults] = {
    "classification": TaskDefaults(metric="accuracy", loss={"cross_entropy": 1.0}),
    "segmentation": TaskDefaults(metric="miou", loss={"dice": 0.5, "cross_entropy": 0.5}),
    # torchvision detectors return their own loss dict; "model" sums it.
    "detection": TaskDefaults(metric="map", loss={"model": 1.0}),
}

# The mask value segmentation leaves out of loss and metrics when data.ignoreIndex is omitted: 255 for 8-bit
# masks, unless it would be a class index.
DEFAULT_IGNORE_INDEX, WIDE_IGNORE_INDEX = 255, 65535


def ignore_index(spec: TrainingJobSpec) -> int | None:
    if spec.task != "segmentation":
        return spec.data.ignore_index
    if spec.data.ignore_index is not None:
        return spec.data.ignore_index
    return DEFAULT_IGNORE_INDEX if (spec.model.num_classes or 0) <= DEFAULT_IGNORE_INDEX else WIDE_IGNORE_INDEX


# Metrics where smaller is better; everything else (accuracy, f1, miou, map, ...) is maximized.
MINIMIZED_METRICS = frozenset({"loss"})


def metric_mode(metric: str) -> MetricMode:
    return "min" if metric.removeprefix("val/") in MINIMIZED_METRICS else "max"


@dataclass(frozen=True)
class Environment:
    """Where a job runs, which decides the defaults the spec leaves open.

    ``storage_root`` is a local directory or s3:// prefix; jobs get <root>/<namespace>/<name>.
    ``checkpoint_root``, when set, puts checkpoints under <checkpoint_root>/<namespace>/<name> instead of
    <run>/checkpoints (for clusters that keep checkpoints in a bucket with its own lifecycle).
    """

    storage_root: str
    checkpoint_root: str | None = None
    image: str = DEFAULT_TRAINER_IMAGE
    default_procs_per_node: int = 1
    endpoint_url: str | None = None
    secret_ref: str | None = None
    staging_cache_claim: str | None = None


def staging_for(spec: TrainingJobSpec, env: Environment, mode: Literal["cluster", "local"]) -> Staging:
    """data.staging with the cluster's default cache claim filled in, unless the spec names a claim or a cacheDir
    (the two are exclusive) or the job runs under kiln run, where the cache is a folder of this machine."""
    staging = spec.data.staging
    if mode == "local" or staging.cache_claim or staging.cache_dir or not env.staging_cache_claim:
        return staging
    return staging.model_copy(update={"cache_claim": env.staging_cache_claim})


class ResolvedMetric(KilnModel):
    """A metric the trainer watches, by the name its evaluator reports (no ``val/`` prefix)."""

    name: Name
    """The metric, for example accuracy or loss."""

    mode: MetricMode
    """max: larger is better; min: smaller is better."""


class ResolvedTrainingJob(KilnModel):
    """What the trainer runs: a TrainingJob's identity plus its fully defaulted spec.

    Every value the trainer needs that the spec may leave open is a required field here, so the trainer
    and the operator read it instead of deriving it again.
    """

    name: Name
    """metadata.name of the TrainingJob."""

    namespace: Name
    """metadata.namespace of the TrainingJob ('local' for kiln run)."""

    uid: Annotated[str, Field(max_length=64)] | None = None
    """metadata.uid; restarts of the same job share it, so they resume rather than start over."""

    spec: TrainingJobSpec
    """The spec with every default applied."""

    metric: ResolvedMetric
    """The validation metric that picks the best checkpoint, and its mode."""

    early_stopping_metric: ResolvedMetric | None
    """The metric early stopping watches; None when early stopping is off."""

    loss_weights: dict[str, float]
    """The loss as a weighted sum of named terms; with loss.schedule, its weights at epoch 0."""

    nodes: Annotated[int, Field(ge=1)]
    """Pods (torchrun nodes)."""

    procs_per_node: Annotated[int, Field(ge=1)]
    """Training processes per node."""

    world_size: int
    """nodes x procsPerNode."""

    run_uri: Uri
    """Root of this job's outputs."""

    checkpoint_uri: Uri
    """Where this job's checkpoints go."""

    image: Name
    """The trainer image."""

    mode: Literal["cluster", "local"] = "cluster"
    """Whether the job runs under the operator or under kiln run."""

    def loss_weights_at(self, epoch: int) -> dict[str, float]:
        """The weights epoch ``epoch`` (from 0) trains with: loss_weights, unless loss.schedule moves them."""
        schedule = self.spec.loss.schedule
        return scheduled_weights(schedule, epoch) if schedule else dict(self.loss_weights)


def scheduled_weights(schedule: Sequence[LossKeyframe], epoch: int) -> dict[str, float]:
    """Linear between the keyframes around ``epoch``; the first keyframe's weights before it, the last one's after.

    Per epoch, not per step: a weight fixed for a whole epoch is what train/loss_weight/<name> reports, and a
    restart mid-epoch resumes with exactly the weights the interrupted attempt used.
    """
    if epoch <= schedule[0].epoch:
        return dict(schedule[0].weights)
    if epoch >= schedule[-1].epoch:
        return dict(schedule[-1].weights)
    low, high = next((a, b) for a, b in pairwise(schedule) if a.epoch <= epoch < b.epoch)
    t = (epoch - low.epoch) / (high.epoch - low.epoch)
    # (1 - t) * a + t * b rather than a + t * (b - a): exactly a at t = 0, exactly b at t = 1.
    return {name: (1 - t) * weight + t * high.weights[name] for name, weight in low.weights.items()}


def _join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts])


def resolve(
    job: TrainingJob, env: Environment, *, mode: Literal["cluster", "local"] = "cluster"
) -> ResolvedTrainingJob:
    spec = job.spec
    namespace = job.metadata.namespace or ("local" if mode == "local" else "default")
    defaults = TASK_DEFAULTS[spec.task]
    run_uri = spec.output.uri or _join(env.storage_root, namespace, job.metadata.name)
    checkpoint_uri = (
        _join(env.checkpoint_root, namespace, job.metadata.name)
        if env.checkpoint_root
        else _join(run_uri, "checkpoints")
    )

    metric_name = (spec.validation.metric or defaults.metric).removeprefix("val/")
    metric = ResolvedMetric(name=metric_name, mode=spec.validation.mode or metric_mode(metric_name))
    validation = spec.validation.model_copy(update={"metric": metric.name, "mode": metric.mode})
    early_stopping, stopping_metric = spec.early_stopping, None
    if early_stopping is not None:
        watched = (early_stopping.metric or metric.name).removeprefix("val/")
        stopping_metric = ResolvedMetric(name=watched, mode=early_stopping.mode or metric_mode(watched))
        early_stopping = early_stopping.model_copy(update={"metric": watched, "mode": stopping_metric.mode})
    # In a cluster each GPU gets a process; on a laptop the GPU request means nothing, so kiln run's
    # environment (the CPU count) decides unless the spec says otherwise.
    per_node_devices = spec.resources.gpus_per_node if mode == "cluster" else 0
    procs = spec.resources.procs_per_node or per_node_devices or env.default_procs_per_node
    checkpoint_uri = spec.checkpoint.uri or checkpoint_uri
    image = spec.image or env.image
    resolved_spec = spec.model_copy(
        update={
            "data": spec.data.model_copy(
                update={"ignore_index": ignore_index(spec), "staging": staging_for(spec, env, mode)}
            ),
            "validation": validation,
            "early_stopping": early_stopping,
            "output": spec.output.model_copy(update={"uri": run_uri}),
            "tracking": resolve_tracking(spec.tracking, namespace, job.metadata.name),
            "checkpoint": spec.checkpoint.model_copy(update={"uri": checkpoint_uri}),
            "resources": spec.resources.model_copy(update={"procs_per_node": procs}),
            "image": image,
            "storage": spec.storage.model_copy(
                update={
                    "endpoint_url": spec.storage.endpoint_url or env.endpoint_url,
                    "secret_ref": spec.storage.secret_ref or env.secret_ref,
                }
            ),
        }
    )
    if spec.loss.schedule:
        loss_weights = dict(spec.loss.schedule[0].weights)
    elif spec.loss.weights:
        loss_weights = dict(spec.loss.weights)
    elif spec.loss.name:
        loss_weights = {spec.loss.name: 1.0}
    else:
        loss_weights = dict(defaults.loss)
    return ResolvedTrainingJob(
        name=job.metadata.name,
        namespace=namespace,
        uid=job.metadata.uid,
        spec=resolved_spec,
        metric=metric,
        early_stopping_metric=stopping_metric,
        loss_weights=loss_weights,
        nodes=spec.resources.nodes,
        procs_per_node=procs,
        world_size=spec.resources.nodes * procs,
        run_uri=run_uri,
        checkpoint_uri=checkpoint_uri,
        image=image,
        mode=mode,
    )


def parse_and_resolve(
    document: Any, env: Environment, *, mode: Literal["cluster", "local"] = "cluster", source: str = ""
) -> ResolvedTrainingJob:
    """A TrainingJob document (decoded YAML, or the apiserver's object) to what the trainer runs, or
    InvalidManifest. The operator and ``kiln run`` both come through here, so they cannot disagree."""
    manifest = parse_manifest(document, source)
    if not isinstance(manifest, TrainingJob):
        raise InvalidManifest([ManifestError(source, "kind", f"expected a TrainingJob, got {manifest.kind}")])
    return resolve(manifest, env, mode=mode)
