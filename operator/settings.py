"""Operator settings: one frozen dataclass, read from the environment or from ``kiln operator``'s flags.

Each field documents its unit and why its default is what it is. ``from_env`` is the only place that reads
the environment; everything downstream receives a ``Settings`` value.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields

from kiln.api.contract import DEFAULT_TRAINER_IMAGE
from kiln.api.resolve import Environment

ENV_PREFIX = "KILN_OPERATOR_"


@dataclass(frozen=True)
class Settings:
    image: str = DEFAULT_TRAINER_IMAGE
    """Trainer image for jobs that leave spec.image out. Pin a digest in production."""

    storage_root: str = "s3://kiln-runs"
    """Default output root (s3:// prefix or path); a job without spec.output.uri writes to
    <root>/<namespace>/<name>. Namespaced, so two teams' jobs of the same name never collide."""

    checkpoint_root: str | None = None
    """Default checkpoint root; a job without spec.checkpoint.uri checkpoints to <root>/<namespace>/<name>.
    Unset: checkpoints go under the output URI (<output>/checkpoints), next to the metrics they belong to."""

    endpoint_url: str | None = None
    """Default S3 endpoint (MinIO, Ceph) for jobs that leave spec.storage.endpointUrl out; unset means AWS."""

    secret_ref: str | None = None
    """Default name of the Secret with AWS_* credentials, looked up in each job's own namespace."""

    staging_cache_claim: str | None = None
    """Default PersistentVolumeClaim, by name in each job's own namespace, that worker pods stage datasets into
    when spec.data.staging names neither cacheClaim nor cacheDir. Unset: an emptyDir per pod, which dies with the
    pod, so every restarted attempt downloads the dataset again; the default because a claim must exist in every
    namespace that runs jobs (ReadWriteMany for multi-node jobs), which only the cluster's admin can arrange.
    Not a hostPath: Pod Security Standards "restricted" forbids hostPath volumes."""

    namespaces: tuple[str, ...] = ()
    """Namespaces to watch (kopf patterns allowed, e.g. 'team-*'); empty watches the whole cluster."""

    metrics_port: int = 8080
    """Port of /metrics, /healthz and /readyz. 8080 is the Prometheus convention for controllers."""

    progress_interval_s: float = 10.0
    """Seconds between polls of rank 0's /progress while a job runs: fresh enough for `kubectl get`, and
    at 1,000 running jobs still only 100 small HTTP requests per second, none of them to the apiserver."""

    progress_timeout_s: float = 2.0
    """Seconds to wait for one /progress answer; a busy rank 0 just misses a poll."""

    resync_interval_s: float = 60.0
    """Seconds after its last reconcile that a TrainingJob or ExportJob is reconciled again with no event. Events
    trigger every other reconcile; the resync is the safety net for a missed one and the only way to notice what
    sends none: a worker pod that cannot start (status says why within this long), a source that never appears.
    At 1,000 jobs, 17 small reconciles a second."""

    run_as_user: int = 1000
    """UID the trainer runs as (PSS restricted needs a non-root UID); the trainer image's user."""

    default_procs_per_node: int = 1
    """Processes per CPU-only pod (gpusPerNode 0) when resources.procsPerNode is left out."""

    workers: int = 48
    """Threads that run the (blocking) handlers. A reconcile spends nearly all its time waiting on the
    apiserver (about 1 s per call when a burst saturates it), so throughput is workers / latency: 16 kept
    200 simultaneous creates queueing in the operator for 10 s; 48 hands them to the apiserver at once.
    Creates fan out 3 calls each, so the connection pool holds 3x this many (idle threads cost ~1 MB)."""

    export_retries: int = 3
    """Retries of an ExportJob's pod after a retriable failure (a signal such as an OOM kill, or a disruption),
    as the batch/v1 Job's backoffLimit: runPolicy.maxRestarts' default for TrainingJobs. Exit codes 1-127 never
    retry (ExportJob has no retriableExitCodes): an invalid input or a failed verification gives the same result."""

    source_grace_s: float = 60.0
    """Seconds an ExportJob waits for a spec.source.trainingJob that does not exist before it fails with
    SourceNotFound: long enough for `kubectl apply -f dir/` to create the TrainingJob after the ExportJob."""

    lease_duration_s: float = 10.0
    """Seconds the leader's Lease (coordination.k8s.io, ``kiln-operator`` in the operator's namespace) stays
    valid after its last renewal. A standby takes over this long after it last saw the leader renew: a killed
    leader is replaced within about this plus retry_period_s plus kopf's start-up (1-2 s), so 10 keeps the
    takeover under 15 s (client-go's 15 would not). Shorter means more renewals for the same deadline margin."""

    renew_deadline_s: float = 8.0
    """Seconds the leader goes on without a successful renewal before its lease process pauses it (SIGSTOP).
    Shorter than lease_duration_s, so a leader that lost the apiserver is frozen before a standby may take over;
    the 2 s between them cover the signal. The lease process keeps trying: a renewal of the still-unchanged
    Lease resumes the operator (SIGCONT), a Lease taken over meanwhile ends it (SIGKILL). A paused operator
    answers no /healthz, so the chart's liveness probe (10 s x 6) bounds the pause: apiserver outages up to
    about a minute are ridden out without a restart; a longer one restarts the container, which takes its own
    Lease back at once (same pod name) if nobody else took it."""

    retry_period_s: float = 1.0
    """Seconds between the leader's renewals and between a standby's tries: one small GET (and PUT) per
    replica per second, nothing to an apiserver, and a takeover at most 1 s after the Lease expired."""

    json_logs: bool = False
    """Log one JSON object per line, for log shippers."""

    extra: Mapping[str, str] = field(default_factory=dict)
    """Unused environment keys with the prefix, kept so a typo can be reported at start-up."""

    def __post_init__(self) -> None:
        # Otherwise a leader could still be reconciling when a standby takes over, or never renew in time.
        if not 0 < self.retry_period_s < self.renew_deadline_s < self.lease_duration_s:
            raise ValueError(
                f"{ENV_PREFIX}RETRY_PERIOD_S ({self.retry_period_s}) < {ENV_PREFIX}RENEW_DEADLINE_S "
                f"({self.renew_deadline_s}) < {ENV_PREFIX}LEASE_DURATION_S ({self.lease_duration_s}) must hold, "
                "all above 0"
            )

    def environment(self) -> Environment:
        """The kiln.api resolve() environment these settings imply."""
        return Environment(
            storage_root=self.storage_root,
            checkpoint_root=self.checkpoint_root,
            image=self.image,
            default_procs_per_node=self.default_procs_per_node,
            endpoint_url=self.endpoint_url,
            secret_ref=self.secret_ref,
            staging_cache_claim=self.staging_cache_claim,
        )


def _convert(name: str, raw: str) -> object:
    kind = {f.name: f.type for f in fields(Settings)}[name]
    if kind == "bool":
        return raw.strip().lower() in {"1", "true", "yes", "on"}
    if kind == "int":
        return int(raw)
    if kind == "float":
        return float(raw)
    if kind == "tuple[str, ...]":
        return tuple(part.strip() for part in raw.split(",") if part.strip())
    return raw or None if "None" in str(kind) else raw


def from_env(environ: Mapping[str, str] | None = None, **overrides: object) -> Settings:
    """Settings from KILN_OPERATOR_<FIELD> variables (e.g. KILN_OPERATOR_IMAGE), then explicit overrides."""
    environ = os.environ if environ is None else environ
    known = {f.name for f in fields(Settings)} - {"extra"}
    values: dict[str, object] = {}
    extra: dict[str, str] = {}
    for key, raw in environ.items():
        if not key.startswith(ENV_PREFIX):
            continue
        name = key.removeprefix(ENV_PREFIX).lower()
        if name in known:
            values[name] = _convert(name, raw)
        else:
            extra[key] = raw
    values.update({key: value for key, value in overrides.items() if value is not None})
    return Settings(**values, extra=extra)  # type: ignore[arg-type]
