"""What the operator, the trainer pods and ``kiln run`` agree on, stated once.

The operator renders pods from these names, the trainer reads them back, and ``kiln run`` imitates the pod
on a laptop with them: the spec file's place, the ports, the environment variables, the exit codes and the
shape of the trainer's report (its ``/progress`` JSON and its termination message). Torch-free and
kopf-free, so every side imports it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from enum import IntEnum
from typing import Annotated, Literal

from pydantic import Field, ValidationError

from kiln.api.base import MAX_TEXT
from kiln.api.status import CheckpointStatus, Progress, StatusModel

# -- files and ports inside a trainer pod -------------------------------------------------------------------
SPEC_DIR = "/etc/kiln"
"""Where the ConfigMap holding the ResolvedTrainingJob is mounted."""
SPEC_FILE = "trainingjob.json"
"""The ConfigMap key, and so the file name, of the ResolvedTrainingJob JSON."""
TERMINATION_LOG = "/dev/termination-log"
"""Kubernetes' default terminationMessagePath; the trainer writes its final report there."""
CACHE_DIR = "/var/cache/kiln"
"""Node-local dataset cache (an emptyDir in the pod)."""
METRICS_PORT = 9400
"""Rank 0 serves /metrics (Prometheus), /progress (the report) and /healthz here."""
RENDEZVOUS_PORT = 29500
"""torchrun's c10d rendezvous port on pod 0 (torch's default)."""
CONTAINER_NAME = "trainer"
"""The trainer container's name in every worker pod."""
DEFAULT_TRAINER_IMAGE = "ghcr.io/kiln-dev/kiln-trainer:0.1.0"
"""The trainer image of jobs that name none, unless the operator is configured with another."""


class Env:
    """Environment variables the operator (or ``kiln run``) sets and the trainer reads."""

    METRICS_PORT = "KILN_METRICS_PORT"
    """Port of rank 0's status server; 0 turns it off."""
    TERMINATION_LOG = "KILN_TERMINATION_LOG"
    """Path the final report is written to."""
    CACHE_DIR = "KILN_CACHE_DIR"
    """Node-local dataset cache root, unless data.staging.cacheDir says otherwise."""
    ATTEMPT = "KILN_ATTEMPT"
    """The TrainingJob's attempt number (1, 2, ...), for the trainer's log lines."""
    LOG_STREAM = "KILN_LOG_STREAM"
    """stdout or stderr (the default): where the trainer's log lines go. ``kiln run`` picks stdout so that
    stderr carries only the launcher's own noise."""


class ExitCode(IntEnum):
    """The trainer's exit codes; the operator's retry policy and ``kiln run`` read them.

    Signals (exit code 128 + n) and pod disruptions are always retriable. ``FAILED`` is retried only when
    runPolicy.retriableExitCodes lists 1; ``INVALID`` never is: a retry cannot fix the input.
    """

    OK = 0
    """Finished, or preempted (SIGTERM) with a checkpoint saved."""
    FAILED = 1
    """Any other failure: an S3 outage, a bug, out of memory."""
    INVALID = 2
    """Invalid input: the spec, the data or a name; the report's reason names the field or file."""
    DEADLINE = 124
    """``kiln run`` only: runPolicy.activeDeadlineSeconds passed (the exit code of coreutils timeout)."""


TrainerState = Literal["running", "completed", "preempted", "failed"]

# Kubernetes truncates termination messages at 4096 bytes; reports stay under this.
REPORT_LIMIT = 4000
REASON_LIMIT = 3000


class TrainerReport(StatusModel):
    """What rank 0 says: served on GET /progress while it runs, written to the termination log at exit."""

    state: TrainerState = "running"
    """running, completed, preempted (SIGTERM, checkpoint saved) or failed."""

    progress: Progress | None = None
    """Epoch, step, metrics and ETA."""

    checkpoints: CheckpointStatus | None = None
    """The latest and best checkpoint URIs."""

    stop_reason: Annotated[str, Field(max_length=MAX_TEXT)] | None = None
    """Why a completed run ended before its last epoch (early stopping)."""

    reason: Annotated[str, Field(max_length=MAX_TEXT)] | None = None
    """One line: why the run failed."""

    exit_code: ExitCode | None = None
    """The trainer's own exit code when it failed (torchrun reports every child failure as 1)."""

    @property
    def finished_cleanly(self) -> bool:
        return self.state in ("completed", "preempted")

    def to_json(self) -> str:
        """Compact JSON under the termination-message limit: metrics are dropped, least important last."""
        payload = self.to_dict()
        progress = payload.get("progress") or {}
        metrics: dict[str, float] = progress.get("metrics", {})
        keep = sorted(metrics, key=lambda name: (not name.startswith("val/"), name))
        while True:
            if progress:
                progress["metrics"] = {name: metrics[name] for name in keep}
            text = json.dumps(payload, separators=(",", ":"))
            if len(text.encode()) <= REPORT_LIMIT or not keep:
                return text
            keep.pop()

    @classmethod
    def failure(cls, reason: str, exit_code: ExitCode) -> TrainerReport:
        return cls(state="failed", reason=" ".join(reason.split())[:REASON_LIMIT], exit_code=exit_code)


def is_retriable_exit(code: int, retriable_exit_codes: Iterable[int]) -> bool:
    """Whether an attempt that ended with exit code ``code`` is worth a whole-gang restart: a signal (128 + n)
    always is, any other code only when runPolicy.retriableExitCodes lists it. The operator (with the trainer's
    own code from its report) and ``kiln run`` both decide with this rule."""
    return code >= 128 or code in set(retriable_exit_codes)


def parse_report(text: str | None) -> TrainerReport | None:
    """A report from a termination message or a /progress body; None when the text is not one.

    Unknown keys are tolerated (a newer trainer may report more); a malformed value is not a report.
    """
    if not text or not text.strip():
        return None
    try:
        data = json.loads(text)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    known = {key: value for key, value in data.items() if key in _REPORT_KEYS}
    try:
        return TrainerReport.model_validate(known)
    except ValidationError:
        return None


_REPORT_KEYS = {field.alias or name for name, field in TrainerReport.model_fields.items()}
