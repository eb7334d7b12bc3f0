"""What ``kiln run`` checks and says before it starts torchrun: torch-free, and well under a second.

``preflight`` finds the input problems a laptop can see without importing torch (a local data path that
does not exist, an S3 endpoint that refuses connections), so they fail in a fraction of a second with a field
path instead of after every rank has imported torch. Names (architectures, optimizers, transforms) are
checked earlier, by ``parse_manifest``'s semantic rules.

``not_applied_locally`` lists the fields the user set that mean something in a cluster but nothing on this
machine; ``NOT_APPLIED`` below is the one list of them, with the reason for each.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel

from kiln.api.manifest import ManifestError
from kiln.api.resolve import ResolvedTrainingJob
from kiln.api.training import TrainingJobSpec

CONNECT_TIMEOUT_S = 1.5

# Fields (camelCase paths under spec) that have no effect under kiln run, and why. A field listed here that
# the user set is named in one line before training starts; nothing is ignored silently.
NOT_APPLIED: dict[str, str] = {
    "resources.cpu": "no CPU request or limit: the processes share this machine",
    "resources.memory": "no memory limit",
    "resources.nodeSelector": "no scheduling: every node runs on this machine",
    "resources.tolerations": "no scheduling: every node runs on this machine",
    "resources.affinity": "no scheduling: every node runs on this machine",
    "data.staging.cacheClaim": "no volumes: data is staged into this machine's cache folder"
    " (data.staging.cacheDir, $KILN_CACHE_DIR or ~/.cache/kiln/data), which outlives runs already",
    "image": "runs this Python environment's kiln, not a container",
    "storage.secretRef": "S3 credentials come from this environment (AWS_* variables, ~/.aws)",
    "tracking.mlflow.credentialsSecret": "MLflow credentials come from this environment (MLFLOW_TRACKING_* variables)",
    "runPolicy.suspend": "kiln run starts now; Ctrl-C suspends (it checkpoints) and running it again resumes",
    "runPolicy.queueName": "no Kueue: the run starts at once",
    "runPolicy.priorityClassName": "no pod priority or preemption",
    "runPolicy.ttlSecondsAfterFinished": "there is no TrainingJob object to delete; outputs stay",
}
# resources.gpusPerNode depends on the machine: 0 hides CUDA from the trainer (it applies), a positive count
# applies when CUDA devices are visible and is listed when there are none.
NO_CUDA = "no CUDA device visible (nvidia-smi): trains on CPU"


def cuda_devices() -> int:
    """CUDA devices the trainer would see, without importing torch: CUDA_VISIBLE_DEVICES, then nvidia-smi."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return 0
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return 0
    try:
        listing = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    count = sum(1 for line in listing.splitlines() if line.startswith("GPU "))
    if visible:
        count = min(count, len([device for device in visible.split(",") if device.strip()]))
    return count


def set_fields(model: BaseModel, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(camelCase path, value) of every field the user wrote, nested models included, in declaration order.

    "Written" is pydantic's ``model_fields_set``: a field given a value equal to its default still counts,
    one left to its default does not.
    """
    for name, field in type(model).model_fields.items():
        if name not in model.model_fields_set:
            continue
        path = f"{prefix}{field.alias or name}"
        value = getattr(model, name)
        yield path, value
        if isinstance(value, BaseModel):
            yield from set_fields(value, f"{path}.")


def not_applied_locally(spec: TrainingJobSpec, *, gpus: Callable[[], int] = cuda_devices) -> list[tuple[str, str]]:
    """(field path, reason) for each field the user set in ``spec`` (as parsed, before resolving) that has no
    local effect. ``gpus`` counts the CUDA devices; it is only asked when gpusPerNode is set."""
    ignored = []
    for path, value in set_fields(spec):
        if path in NOT_APPLIED:
            ignored.append((path, NOT_APPLIED[path]))
        elif path == "resources.gpusPerNode" and value and gpus() == 0:
            ignored.append((path, NO_CUDA))
    return ignored


# -- pre-flight -----------------------------------------------------------------------------------------------


def _local_path(uri: str, cwd: Path) -> Path | None:
    """The path a local URI names (relative ones from ``cwd``, where the trainer runs); None for s3://."""
    if uri.startswith("s3://"):
        return None
    path = Path(uri.removeprefix("file://")).expanduser()
    return path if path.is_absolute() else cwd / path


def _uris(job: ResolvedTrainingJob) -> Iterator[tuple[str, str]]:
    """(field path under spec, URI) of every input the trainer reads, then of its outputs."""
    spec = job.spec
    for split in ("train", "val", "test"):
        source = getattr(spec.data, split)
        if source is not None:
            yield f"data.{split}.uri", source.uri
    if spec.model.pretrained:
        yield "model.pretrained", spec.model.pretrained
    if spec.checkpoint.resume not in ("auto", "never"):
        yield "checkpoint.resume", spec.checkpoint.resume
    yield "output.uri", job.run_uri
    yield "checkpoint.uri", job.checkpoint_uri


INPUTS = ("data.train.uri", "data.val.uri", "data.test.uri", "model.pretrained", "checkpoint.resume")


def _endpoint(job: ResolvedTrainingJob) -> tuple[str, str] | None:
    """(environment variable or "" for the spec, URL) of the S3 endpoint, in the trainer's order of precedence
    (kiln.storage.s3.resolve_endpoint: the spec, then AWS_ENDPOINT_URL_S3, then AWS_ENDPOINT_URL); None for
    AWS itself. kiln.storage is not imported: it would bring boto3."""
    if job.spec.storage.endpoint_url:
        return "", job.spec.storage.endpoint_url
    for variable in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        if os.environ.get(variable):
            return variable, os.environ[variable]
    return None


def _unreachable(url: str) -> str | None:
    """Why a TCP connection to the endpoint fails, or None when it connects."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"{url} is not an http(s) URL"
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        return f"{url}: {exc}"
    try:
        with socket.create_connection((parts.hostname, port), timeout=CONNECT_TIMEOUT_S):
            return None
    except TimeoutError:
        return f"cannot connect to {parts.hostname}:{port}: no answer in {CONNECT_TIMEOUT_S:g} s"
    except OSError as exc:
        return f"cannot connect to {parts.hostname}:{port}: {exc.strerror or exc}"


def preflight(job: ResolvedTrainingJob, source: str, cwd: Path) -> list[ManifestError]:
    """Problems ``kiln run`` can see before launching, one per field: local inputs that do not exist, an S3
    endpoint that does not accept connections. No torch, no boto3; at most one TCP connect."""
    errors = []
    uses_s3 = False
    for field, uri in _uris(job):
        path = _local_path(uri, cwd)
        if path is None:
            uses_s3 = True
        elif field in INPUTS and not path.exists():
            relative = not Path(uri.removeprefix("file://")).expanduser().is_absolute()
            errors.append(
                ManifestError(source, f"spec.{field}", f"{uri} does not exist" + (f" (in {cwd})" if relative else ""))
            )
    endpoint = _endpoint(job) if uses_s3 else None
    if endpoint is not None and (problem := _unreachable(endpoint[1])) is not None:
        variable, url = endpoint
        errors.append(
            ManifestError(
                source, "spec.storage.endpointUrl", f"{problem} ({url} from ${variable})" if variable else problem
            )
        )
    return errors
