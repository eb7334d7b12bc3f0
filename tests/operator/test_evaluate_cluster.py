"""Evaluating a checkpoint in-cluster: a TrainingJob with ``epochs: 0`` and ``checkpoint.resume: <uri>``, through
the operator, the control plane, a real torchrun pod on the local executor and moto S3.

The checkpoint comes from a tiny real training run (in this process, checkpointing to S3). The TrainingJob names a
training split that does not exist, which an evaluation never reads; it evaluates the checkpoint on an S3 test
split and ends Succeeded with the test metrics in its status, and evaluation.json and the predictions in its
output, whose numbers scikit-learn recomputes from the predictions.
"""

from __future__ import annotations

import csv
import io
import json
import signal
from pathlib import Path

import pytest
import yaml
from operator_process import OperatorProcess
from sklearn.metrics import accuracy_score
from test_end_to_end import create_secret, diagnostics, manifest, watch_until_finished

from kiln.api.contract import ExitCode
from kiln.testing.controlplane import ControlPlane
from kiln.testing.s3 import S3Server
from kiln.trainer.train import main as train_main
from tests.trainer.trainer_testkit import make_job, trainer_env, write_images, write_spec

pytestmark = [pytest.mark.controlplane, pytest.mark.slow, pytest.mark.timeout(300)]

NAME = "evaluate-best"


def train_to_s3(tmp_path: Path, bucket: str, s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> str:
    """One epoch of the debug classifier on local images, checkpointing to S3; the checkpoint root's URI."""
    data = tmp_path / "data"
    write_images(data / "train", 8, seed=1)
    write_images(data / "val", 3, seed=2)
    root = f"s3://{bucket}/source/checkpoints"
    job = make_job(tmp_path, data, name="source", epochs=1, checkpoint={"uri": root},
                   storage={"endpointUrl": s3.endpoint_url})  # fmt: skip
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    for key, value in trainer_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    assert train_main(["--spec", str(write_spec(job, tmp_path / "spec.json"))]) == ExitCode.OK
    for sig, handler in handlers.items():
        signal.signal(sig, handler)
    return root


def read_s3(s3: S3Server, bucket: str, key: str) -> bytes:
    return s3.client().get_object(Bucket=bucket, Key=key)["Body"].read()  # type: ignore[no-any-return]


def test_an_epochs_0_trainingjob_evaluates_a_checkpoint_on_s3_data(
    cluster: ControlPlane, kiln_operator: OperatorProcess, namespace: str, s3_server: S3Server, s3_bucket: str,
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    checkpoints = train_to_s3(tmp_path, s3_bucket, s3_server, monkeypatch)
    test = write_images(tmp_path / "test", 4, seed=3)
    for image in sorted(test.rglob("*.png")):
        s3_server.client().upload_file(str(image), s3_bucket, f"test/{image.relative_to(test).as_posix()}")
    create_secret(cluster, namespace, s3_server)
    document = manifest(namespace, s3_bucket, s3_server, name=NAME)
    spec = document["spec"]
    spec["model"] = {"architecture": "debug"}
    spec["data"].update(train={"uri": f"s3://{s3_bucket}/never-read/train"}, test={"uri": f"s3://{s3_bucket}/test"})
    del spec["data"]["val"]
    spec.update(epochs=0, checkpoint={"resume": checkpoints, "uri": f"s3://{s3_bucket}/runs/{NAME}/checkpoints"})
    spec["resources"]["nodes"] = 1
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(document))

    tj, _ = watch_until_finished(cluster, namespace, timeout=200, name=NAME)
    assert tj["status"]["phase"] == "Succeeded", diagnostics(cluster, namespace, kiln_operator, NAME)
    metrics = tj["status"]["progress"]["metrics"]
    output = f"runs/{NAME}/output"
    evaluation = json.loads(read_s3(s3_server, s3_bucket, f"{output}/evaluation.json"))["test"]
    best = json.loads(read_s3(s3_server, s3_bucket, "source/checkpoints/best.json"))["name"]
    assert evaluation["checkpoint"] == f"{checkpoints}/{best}/state.pt"
    rows = list(csv.DictReader(io.StringIO(read_s3(s3_server, s3_bucket, f"{output}/predictions-test.csv").decode())))
    assert len(rows) == 12
    accuracy = accuracy_score([r["label"] for r in rows], [r["prediction"] for r in rows])
    assert evaluation["metrics"]["accuracy"] == pytest.approx(accuracy, abs=1e-6)
    assert metrics["test/accuracy"] == pytest.approx(accuracy, abs=1e-6)
    assert read_s3(s3_server, s3_bucket, f"{output}/confusion.png").startswith(b"\x89PNG")
