"""MLflow credentials on real parts: ``mlflow server --app-name basic-auth`` on loopback (MLflow's own login
check), and ``python -m kiln.trainer``'s main() in this process with MLFLOW_TRACKING_USERNAME/PASSWORD in its
environment, as the operator sets them from ``tracking.mlflow.credentialsSecret``.

The right password logs the run; a wrong one is a one-line warning while training completes, creates nothing on
the server, and neither password reaches the log.
"""

from __future__ import annotations

import configparser
import json
import logging
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from inprocess import run_main, summary
from tracking_server import mlflow_server
from trainer_testkit import make_job

from kiln.api.resolve import ResolvedTrainingJob

pytestmark = pytest.mark.slow
ADMIN, PASSWORD, WRONG_PASSWORD = "kiln-admin", "right-password-4b1e9a", "wrong-password-7c2d05"


@pytest.fixture(scope="module")
def auth_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A basic-auth MLflow server whose only user is ADMIN/PASSWORD; anyone else may do nothing."""
    root = tmp_path_factory.mktemp("mlflow-auth")
    config = configparser.ConfigParser()
    # The keys of mlflow/server/auth/basic_auth.ini; the admin user is created on the first start.
    config["mlflow"] = {
        "default_permission": "NO_PERMISSIONS",
        "database_uri": f"sqlite:///{root}/basic_auth.db",
        "admin_username": ADMIN,
        "admin_password": PASSWORD,
        "authorization_function": "mlflow.server.auth:authenticate_request_basic_auth",
        # Each request's password check is a deliberately slow hash; remembering a good login for a while
        # (wrong ones are never remembered) keeps the run's many small requests from taking seconds each.
        "auth_cache_ttl_seconds": "600",
    }
    ini = root / "basic_auth.ini"
    with ini.open("w") as file:
        config.write(file)
    # The auth app refuses to start without a fixed key for its CSRF protection.
    env = {"MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_FLASK_SERVER_SECRET_KEY": "kiln-tests-csrf-key"}
    with mlflow_server(root, "--app-name", "basic-auth", env=env) as uri:
        yield uri


def train(root: Path, data: Path, uri: str, experiment: str, run_name: str) -> ResolvedTrainingJob:
    """main() on a 1-epoch classification job that logs to ``uri``; it must complete."""
    tracking = {"mlflow": {"uri": uri, "experiment": experiment, "runName": run_name}}
    job = make_job(root, data, epochs=1, tracking=tracking)
    code, message = run_main(root, job)
    assert code == 0 and message["state"] == "completed", message
    return job


def test_the_secrets_login_logs_the_run_on_a_basic_auth_server(
    auth_uri: str, isolated: Path, tiny_data: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    from mlflow.tracking import MlflowClient

    with pytest.raises(urllib.error.HTTPError) as refused:  # the server does check: no login, no answer
        urllib.request.urlopen(f"{auth_uri}/api/2.0/mlflow/experiments/search?max_results=1", timeout=10)
    assert refused.value.code == 401
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ADMIN)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    with caplog.at_level(logging.INFO):
        job = train(isolated, tiny_data, auth_uri, "kiln-auth", "with-login")
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and "MLflow" in r.getMessage()]
    client = MlflowClient(auth_uri)
    experiment = client.get_experiment_by_name("kiln-auth")
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "with-login" and run.info.status == "FINISHED"
    assert (run.data.params["optimizer.lr"], run.data.params["task"]) == ("0.01", "classification")
    history = [json.loads(line) for line in (Path(job.run_uri) / "metrics.jsonl").read_text().splitlines()]
    accuracy = client.get_metric_history(run.info.run_id, "val/accuracy")
    assert [(m.step, m.value) for m in accuracy] == [(r["step"], pytest.approx(r["val/accuracy"])) for r in history]
    # The artifacts go through the server's proxy, a second path that must carry the login.
    assert [a.path for a in client.list_artifacts(run.info.run_id, "checkpoints/best")] == ["checkpoints/best/state.pt"]
    assert summary(job)["mlflow"]["runId"] == run.info.run_id
    assert PASSWORD not in caplog.text + "".join(capfd.readouterr())


def test_a_wrong_password_is_one_warning_training_completes_and_nothing_is_created(
    auth_uri: str, isolated: Path, tiny_data: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ADMIN)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", WRONG_PASSWORD)
    with caplog.at_level(logging.INFO):
        job = train(isolated, tiny_data, auth_uri, "kiln-auth-denied", "wrong-login")
    output = caplog.text + "".join(capfd.readouterr())
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and "MLflow" in r.getMessage()]
    assert len(warnings) == 1, warnings  # the first refusal turns MLflow off; later calls are not reported
    assert warnings[0].startswith(f"MLflow: could not start the run at {auth_uri}") and "401" in warnings[0]
    assert "training goes on" in warnings[0] and "\n" not in warnings[0]
    assert WRONG_PASSWORD not in output and PASSWORD not in output
    assert (Path(job.run_uri) / "curves.png").exists() and "mlflow" not in summary(job)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)  # read back as the admin
    client = MlflowClient(auth_uri)
    assert client.get_experiment_by_name("kiln-auth-denied") is None
    everywhere = [e.experiment_id for e in client.search_experiments()]
    assert client.search_runs(everywhere, filter_string="attributes.run_name = 'wrong-login'") == []
