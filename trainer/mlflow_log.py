"""One TrainingJob as one MLflow run, across restarts: parameters, metrics per step and per epoch, tags, and the
best checkpoint as an artifact.

The run's id is kept in the checkpoint store (``mlflow-run.json``, beside ``latest.json``) as soon as the run
exists, and a job with a uid is also found again by its ``kiln.uid`` tag: a restarted or resumed process
continues that run (status RUNNING again) and never opens a second one. Parameters are logged once: MLflow
refuses to change a logged value, so a value edited since (epochs raised) keeps its first one, said in the log.

The best checkpoint goes up as an artifact (``checkpoints/best/state.pt``); its URI is also set as the tag
``kiln.bestCheckpoint``, which stays the way to find it when the artifact store cannot be reached (then a
warning says so). Credentials come from MLFLOW_TRACKING_USERNAME/PASSWORD or MLFLOW_TRACKING_TOKEN in the
environment (a Secret in a cluster), which the MLflow client reads itself; no message here carries them.

Everything runs on the tracking worker thread. The first failure to reach the server ends MLflow logging for
this process with one warning; training goes on.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.api.resolve import ResolvedTrainingJob
from kiln.api.tracking import MLFLOW_CREDENTIAL_KEYS, MlflowSpec
from kiln.storage import StorageError, Store, scrub

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

RUN_FILE = "mlflow-run.json"
# The MLflow client retries a refused connection 7 times over about 4 minutes by default; a training job should
# learn sooner that its optional tracking server is away. A user's own MLFLOW_HTTP_REQUEST_* settings win.
CLIENT_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
STATUS = {"completed": "FINISHED", "preempted": "KILLED", "failed": "FAILED"}
_NAME_CHARACTERS = re.compile(r"[^/\w.\- :]")  # what MLflow accepts in metric and parameter names


class MlflowLog:
    def __init__(self, spec: MlflowSpec, job: ResolvedTrainingJob, checkpoints: Store) -> None:
        for name, value in CLIENT_DEFAULTS.items():
            os.environ.setdefault(name, value)
        from mlflow.tracking import MlflowClient  # a heavy import: only for jobs that ask for MLflow

        self.spec, self.job, self.checkpoints = spec, job, checkpoints
        self.client: MlflowClient = MlflowClient(tracking_uri=spec.uri)
        self.run_id = self._continue_or_create()
        self.url = f"{spec.uri.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{self.run_id}"

    # -- the run ------------------------------------------------------------------------------------------
    def _continue_or_create(self) -> str:
        experiment = self.spec.experiment or self.job.namespace
        found = self.client.get_experiment_by_name(experiment)
        self.experiment_id = found.experiment_id if found is not None else self.client.create_experiment(experiment)
        run_id = self._known_run()
        if run_id is not None:
            self.client.update_run(run_id, status="RUNNING")
            log.info("MLflow: continuing run %s in experiment %r", run_id, experiment)
            return run_id
        tags = {"kiln.namespace": self.job.namespace, "kiln.name": self.job.name, "kiln.uid": self.job.uid or ""}
        run = self.client.create_run(self.experiment_id, tags=tags, run_name=self.spec.run_name or self.job.name)
        record = {"runId": run.info.run_id, "experimentId": self.experiment_id, "trackingUri": self.spec.uri}
        self.checkpoints.write_bytes(RUN_FILE, json.dumps(record).encode())
        log.info("MLflow: started run %s in experiment %r", run.info.run_id, experiment)
        return str(run.info.run_id)

    def _known_run(self) -> str | None:
        """This job's run from an earlier process: the id kept beside the checkpoints, else the kiln.uid tag."""
        try:
            record = json.loads(self.checkpoints.read_bytes(RUN_FILE))
        except (StorageError, ValueError):
            record = {}
        run_id = record.get("runId") if record.get("trackingUri") == self.spec.uri else None
        if run_id is not None and self._live(run_id):
            return str(run_id)
        if run_id is not None:
            log.warning("MLflow: run %s of %s is gone (deleted?); starting a new one", run_id, RUN_FILE)
        if self.job.uid:
            runs = self.client.search_runs(
                [self.experiment_id], filter_string=f"tags.`kiln.uid` = '{self.job.uid}'", max_results=1
            )
            if runs:
                return str(runs[0].info.run_id)
        return None

    def _live(self, run_id: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_run(run_id).info.lifecycle_stage == "active"
        except MlflowException:
            return False

    # -- logging ------------------------------------------------------------------------------------------
    def params(self, params: Mapping[str, Any]) -> None:
        """Parameters not logged yet; an earlier process's values stay (MLflow refuses to change them)."""
        from mlflow.entities import Param

        logged = self.client.get_run(self.run_id).data.params
        wanted = {_name(key): str(value)[:6000] for key, value in params.items()}
        changed = sorted(key for key, value in wanted.items() if key in logged and logged[key] != value)
        if changed:
            log.info("MLflow: parameters changed since the run started keep their first values: %s", ", ".join(changed))
        fresh = [Param(key, value) for key, value in wanted.items() if key not in logged]
        if fresh:
            self.client.log_batch(self.run_id, params=fresh)

    def metrics(self, step: int, values: Mapping[str, float], timestamp_ms: int) -> None:
        from mlflow.entities import Metric

        batch = [Metric(_name(key), float(value), timestamp_ms, step) for key, value in values.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def artifact(self, name: str, data: bytes, folder: str) -> None:
        with tempfile.TemporaryDirectory(prefix="kiln-mlflow-") as tmp:
            path = Path(tmp) / name
            path.write_bytes(data)
            self.client.log_artifact(self.run_id, str(path), artifact_path=folder)

    def best_checkpoint(self, key: str, uri: str) -> None:
        """Tag the best checkpoint's URI, then upload it; an unreachable artifact store leaves the tag."""
        self.client.set_tag(self.run_id, "kiln.bestCheckpoint", uri)
        with tempfile.TemporaryDirectory(prefix="kiln-mlflow-") as tmp:
            path = Path(tmp) / Path(key).name
            self.checkpoints.download_file(key, path)
            try:
                self.client.log_artifact(self.run_id, str(path), artifact_path="checkpoints/best")
            except Exception as exc:
                log.warning("MLflow: the best checkpoint was not uploaded (%s); its URI is in the tag "
                            "kiln.bestCheckpoint", clean(exc))  # fmt: skip

    def end(self, state: str) -> None:
        self.client.set_terminated(self.run_id, status=STATUS.get(state, "FAILED"), end_time=now_ms())


def now_ms() -> int:
    return int(time.time() * 1000)


def _name(key: str) -> str:
    return _NAME_CHARACTERS.sub("_", key)[:250]


def clean(error: BaseException) -> str:
    """One line about ``error`` without a credential: MLflow's own from the environment, S3's, user:pass@."""
    text = f"{type(error).__name__}: {error}"
    for name in MLFLOW_CREDENTIAL_KEYS[1:]:  # the username is an identifier, not a secret
        secret = os.environ.get(name, "")
        if len(secret) >= 4:
            text = text.replace(secret, "***")
    return scrub(text)
