"""Defaults resolved in one place: what the operator renders from and the trainer runs."""

from __future__ import annotations

from typing import Any

import pytest

from kiln.api import Environment, ResolvedTrainingJob, TrainingJob, resolve

ENV = Environment(storage_root="s3://kiln-runs", image="registry.local/kiln:1", default_procs_per_node=1)


def job(task: str = "classification", **spec: Any) -> TrainingJob:
    formats = {"classification": "imagefolder", "segmentation": "segmentation-folder", "detection": "coco"}
    models = {
        "classification": {"architecture": "resnet18"},
        "segmentation": {"architecture": "unet", "encoder": "resnet34", "numClasses": 3},
        "detection": {"architecture": "fasterrcnn_resnet50_fpn_v2"},
    }
    document = {
        "apiVersion": "kiln.dev/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {"name": "run", "namespace": "team-a", "uid": "1234"},
        "spec": {
            "task": task,
            "model": models[task],
            "data": {"train": {"uri": "s3://data/train", "format": formats[task]}, "valSplit": 0.1},
            **spec,
        },
    }
    # The schema only: resolve fills in defaults for every task in the API, including those the trainer does not
    # implement yet, which the semantic checks (parse_manifest) refuse.
    return TrainingJob.model_validate(document)


@pytest.mark.parametrize(
    ("task", "metric", "mode", "loss"),
    [
        ("classification", "accuracy", "max", {"cross_entropy": 1.0}),
        ("segmentation", "miou", "max", {"dice": 0.5, "cross_entropy": 0.5}),
        ("detection", "map", "max", {"model": 1.0}),
    ],
)
def test_task_defaults(task: str, metric: str, mode: str, loss: dict[str, float]) -> None:
    resolved = resolve(job(task), ENV)
    assert (resolved.spec.validation.metric, resolved.spec.validation.mode) == (metric, mode)
    assert resolved.loss_weights == loss


def test_uris_follow_namespace_and_name() -> None:
    resolved = resolve(job(), ENV)
    assert resolved.run_uri == "s3://kiln-runs/team-a/run"
    assert resolved.spec.output.uri == resolved.run_uri
    assert resolved.spec.checkpoint.uri == "s3://kiln-runs/team-a/run/checkpoints"


def test_checkpoint_root_moves_checkpoints_only() -> None:
    env = Environment(storage_root="s3://runs", checkpoint_root="s3://ckpts/")
    resolved = resolve(job(), env)
    assert resolved.spec.checkpoint.uri == "s3://ckpts/team-a/run"
    assert resolved.run_uri == "s3://runs/team-a/run"


def test_explicit_values_win() -> None:
    resolved = resolve(
        job(
            output={"uri": "/mnt/out"},
            checkpoint={"uri": "s3://ckpt/x"},
            validation={"metric": "loss"},
            earlyStopping={"patience": 2},
            loss={"name": "focal"},
            resources={"nodes": 2, "gpusPerNode": 4, "procsPerNode": 2},
            image="mine:2",
        ),
        ENV,
    )
    assert resolved.spec.checkpoint.uri == "s3://ckpt/x"
    assert resolved.run_uri == "/mnt/out"
    assert resolved.spec.validation.mode == "min", "loss is minimized"
    assert resolved.spec.early_stopping is not None
    assert (resolved.spec.early_stopping.metric, resolved.spec.early_stopping.mode) == ("loss", "min")
    assert resolved.loss_weights == {"focal": 1.0}
    assert resolved.world_size == 4
    assert resolved.spec.image == "mine:2"


def test_procs_per_node_falls_back_to_gpus_then_environment() -> None:
    assert resolve(job(resources={"gpusPerNode": 8, "nodes": 2}), ENV).world_size == 16
    cpu_only = Environment(storage_root="/tmp/x", default_procs_per_node=3)
    assert resolve(job(resources={"gpusPerNode": 0}), cpu_only).world_size == 3


def test_local_mode_ignores_the_gpu_request_for_process_count() -> None:
    laptop = Environment(storage_root="/tmp/x", default_procs_per_node=2)
    assert resolve(job(resources={"gpusPerNode": 4}), laptop, mode="local").world_size == 2
    assert resolve(job(resources={"procsPerNode": 3}), laptop, mode="local").world_size == 3


def test_operator_storage_defaults_fill_blanks_only() -> None:
    env = Environment(storage_root="s3://r", endpoint_url="http://minio:9000", secret_ref="kiln-s3")
    assert resolve(job(), env).spec.storage.secret_ref == "kiln-s3"
    assert resolve(job(storage={"secretRef": "mine"}), env).spec.storage.secret_ref == "mine"


def test_resolved_job_round_trips_through_json() -> None:
    resolved = resolve(job(), ENV)
    assert ResolvedTrainingJob.model_validate_json(resolved.model_dump_json(by_alias=True)) == resolved


def test_local_mode_uses_local_namespace() -> None:
    manifest = job()
    local = manifest.model_copy(update={"metadata": manifest.metadata.model_copy(update={"namespace": None})})
    resolved = resolve(local, Environment(storage_root="/work/.kiln"), mode="local")
    assert resolved.run_uri == "/work/.kiln/local/run"


def keyframe(epoch: int, **weights: float) -> dict[str, Any]:
    return {"epoch": epoch, "weights": weights}


def test_a_loss_schedule_interpolates_per_epoch_and_holds_outside_its_keyframes() -> None:
    schedule = [keyframe(5, dice=0.0, cross_entropy=1.0), keyframe(15, dice=1.0, cross_entropy=0.5),
                keyframe(20, dice=0.4, cross_entropy=0.5)]  # fmt: skip
    resolved = resolve(job("segmentation", epochs=30, loss={"schedule": schedule}), ENV)
    assert resolved.loss_weights == {"dice": 0.0, "cross_entropy": 1.0}, "the weights at epoch 0"
    expected = {
        0: (0.0, 1.0),  # before the first keyframe: held
        5: (0.0, 1.0),
        8: (0.3, 0.85),  # 3/10 of the way from epoch 5 to 15
        14: (0.9, 0.55),
        15: (1.0, 0.5),
        17: (0.76, 0.5),  # 2/5 of the way from 15 to 20: dice falls again
        20: (0.4, 0.5),
        29: (0.4, 0.5),  # after the last keyframe: held
    }
    for epoch, (dice, cross_entropy) in expected.items():
        got = resolved.loss_weights_at(epoch)
        assert got == pytest.approx({"dice": dice, "cross_entropy": cross_entropy}, abs=1e-12), epoch


def test_the_issue_example_meets_halfway() -> None:
    schedule = [keyframe(0, dice=0.2, cross_entropy=0.8), keyframe(20, dice=0.8, cross_entropy=0.2)]
    resolved = resolve(job("segmentation", epochs=40, loss={"schedule": schedule}), ENV)
    assert resolved.loss_weights_at(10) == pytest.approx({"dice": 0.5, "cross_entropy": 0.5}, abs=1e-12)
    assert resolved.loss_weights_at(5) == pytest.approx({"dice": 0.35, "cross_entropy": 0.65}, abs=1e-12)
    assert resolved.loss_weights_at(20) == {"dice": 0.8, "cross_entropy": 0.2}, "keyframes are exact"


def test_without_a_schedule_the_weights_never_move() -> None:
    resolved = resolve(job("segmentation", loss={"weights": {"dice": 0.3, "focal": 0.7}}), ENV)
    assert resolved.loss_weights_at(0) == resolved.loss_weights_at(9) == {"dice": 0.3, "focal": 0.7}


def test_mlflow_experiment_and_run_name_default_to_namespace_and_name() -> None:
    tracking = resolve(job(tracking={"mlflow": {"uri": "https://mlflow.example.com"}}), ENV).spec.tracking
    assert tracking.mlflow is not None
    assert (tracking.mlflow.experiment, tracking.mlflow.run_name) == ("team-a", "run")
    assert resolve(job(), ENV).spec.tracking.mlflow is None


@pytest.mark.parametrize("uri", ["https://user:secret@mlflow.example.com", "databricks", "mlflow.example.com"])
def test_mlflow_uri_is_an_http_url_without_credentials(uri: str) -> None:
    with pytest.raises(ValueError, match="without user:password@"):
        job(tracking={"mlflow": {"uri": uri}})
