"""One true end-to-end run: operator, control plane, local pod executor, real torchrun, moto S3.

A TrainingJob with two nodes lands on the local executor node; the executor runs both pods of the Indexed Job
as real ``torchrun ... -m kiln.trainer`` processes that rendezvous on 127.0.0.1, stage a tiny digits
imagefolder from S3 (moto), train ``debug_small`` for two epochs and checkpoint back to S3. The operator polls
rank 0's /progress while it runs and reads the final state from rank 0's termination message. A segmentation
job (a tiny smp U-Net on the synthetic shapes) and a detection job (a small torchvision Faster R-CNN on the
synthetic boxes) take the same path once more.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from operator_process import OperatorProcess

from kiln.testing.controlplane import ControlPlane
from kiln.testing.kube import namespaced
from kiln.testing.nodes import executor_node_selector, pod_tolerations_for_executor
from kiln.testing.s3 import S3Server
from kiln.trainer.shapes import write_shapes

pytestmark = [pytest.mark.controlplane, pytest.mark.slow, pytest.mark.timeout(300)]

NAME = "digits"
SHAPES = "shapes"
PER_CLASS = {"train": 30, "val": 10}  # 300 training and 100 validation images


def upload_digits(s3: S3Server, bucket: str, tmp_path: Path) -> int:
    """The demo's digits imagefolder, a few per class, under s3://bucket/digits/{train,val}/<class>/."""
    from kiln.trainer.demo import materialize

    local = materialize(tmp_path / "digits")
    count = 0
    for split, per_class in PER_CLASS.items():
        for folder in sorted((local / split).iterdir()):
            for image in sorted(folder.glob("*.png"))[:per_class]:
                s3.client().upload_file(str(image), bucket, f"digits/{split}/{folder.name}/{image.name}")
                count += 1
    return count


def create_secret(cluster: ControlPlane, namespace: str, s3: S3Server) -> dict[str, str]:
    values = {key: s3.env[key] for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    cluster.kube.create(
        namespaced("secrets", namespace),
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3-creds"}, "stringData": values},
    )
    return values


def manifest(namespace: str, bucket: str, s3: S3Server, name: str = NAME) -> dict[str, Any]:
    return {
        "apiVersion": "kiln.dev/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "task": "classification",
            "model": {"architecture": "debug_small"},
            "data": {
                "train": {"uri": f"s3://{bucket}/digits/train", "format": "imagefolder"},
                "val": {"uri": f"s3://{bucket}/digits/val", "format": "imagefolder"},
                "imageSize": 16,
                "batchSize": 16,
                "workers": 0,
            },
            "epochs": 2,
            "validation": {"every": 1, "metric": "accuracy"},
            "checkpoint": {"uri": f"s3://{bucket}/runs/{name}/checkpoints", "everyEpochs": 1},
            "output": {"uri": f"s3://{bucket}/runs/{name}/output"},
            "resources": {
                "nodes": 2,
                "procsPerNode": 1,
                "gpusPerNode": 0,
                "nodeSelector": executor_node_selector(),
                "tolerations": pod_tolerations_for_executor(),
            },
            "storage": {"endpointUrl": s3.endpoint_url, "region": "us-east-1", "secretRef": "s3-creds"},
            "runPolicy": {"maxRestarts": 0, "terminationGracePeriodSeconds": 10},
        },
    }


def get_tj(cluster: ControlPlane, namespace: str, name: str = NAME) -> dict[str, Any]:
    return cluster.kube.get(f"/apis/kiln.dev/v1alpha1/namespaces/{namespace}/trainingjobs/{name}")


def diagnostics(cluster: ControlPlane, namespace: str, operator: OperatorProcess, name: str = NAME) -> str:
    """Everything needed to see why a run went wrong: the status, the pods' logs, the operator's log."""
    parts = [json.dumps(get_tj(cluster, namespace, name).get("status"), indent=1)]
    for pod in cluster.kube.get(namespaced("pods", namespace))["items"]:
        pod_name = pod["metadata"]["name"]
        path = cluster.pod_log_path(namespace, pod_name)
        log = path.read_text(errors="replace")[-4000:] if path.exists() else "(no log)"
        parts.append(f"--- pod {pod_name}: {json.dumps(pod.get('status', {}))[:2000]}\n{log}")
    parts.append("--- operator log\n" + operator.log()[-4000:])
    return "\n".join(parts)


def watch_until_finished(
    cluster: ControlPlane, namespace: str, timeout: float, name: str = NAME
) -> tuple[dict[str, Any], int]:
    """Poll the TrainingJob until it finishes; return its last state and the largest step seen while Running."""
    deadline = time.monotonic() + timeout
    live_step = 0
    while time.monotonic() < deadline:
        tj = get_tj(cluster, namespace, name)
        status = tj.get("status") or {}
        if status.get("phase") == "Running":
            live_step = max(live_step, int((status.get("progress") or {}).get("step") or 0))
        if status.get("phase") in ("Succeeded", "Failed"):
            return tj, live_step
        time.sleep(0.2)
    return get_tj(cluster, namespace, name), live_step


def s3_exists(s3: S3Server, uri: str) -> bool:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    listed = s3.client().list_objects_v2(Bucket=bucket, Prefix=key)
    return any(item["Key"] == key for item in listed.get("Contents", []))


def test_trainingjob_trains_on_the_local_executor_with_s3(
    cluster: ControlPlane,
    kiln_operator: OperatorProcess,
    namespace: str,
    s3_server: S3Server,
    s3_bucket: str,
    tmp_path: Path,
) -> None:
    assert upload_digits(s3_server, s3_bucket, tmp_path) == 400
    secrets = create_secret(cluster, namespace, s3_server)
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(manifest(namespace, s3_bucket, s3_server)))

    tj, live_step = watch_until_finished(cluster, namespace, timeout=240)
    assert tj["status"]["phase"] == "Succeeded", diagnostics(cluster, namespace, kiln_operator)
    wait = cluster.kubectl("wait", "--for=condition=Succeeded", f"tj/{NAME}", "-n", namespace, "--timeout=10s",
                           check=False)  # fmt: skip
    assert wait.returncode == 0, wait.stderr

    status = tj["status"]
    assert status["attempt"] == 1 and status["restarts"] == 0, status
    assert status["workers"]["succeeded"] == 2, status
    progress = status["progress"]
    assert progress["epoch"] == 2 and progress["totalEpochs"] == 2 and progress["step"] > 0, progress
    assert progress["percent"] == 100.0, progress
    assert "val/accuracy" in progress["metrics"] and progress["metric"].startswith("accuracy="), progress
    checkpoints = status["checkpoints"]
    for key in ("latest", "best"):
        uri = checkpoints[key]
        assert uri.startswith(f"s3://{s3_bucket}/runs/{NAME}/checkpoints/"), checkpoints
        assert s3_exists(s3_server, uri), f"{key} checkpoint {uri} is not in the bucket"
    assert isinstance(checkpoints["bestMetric"], float), checkpoints
    assert s3_exists(s3_server, f"s3://{s3_bucket}/runs/{NAME}/output/metrics.jsonl")

    # Live progress reached the status while the job ran, not only at the end (polled every second; two
    # epochs on CPU take several seconds, so at least one poll lands mid-run).
    assert live_step > 0, "no progress observed while Running"

    # The credentials reach the pods as environment only: never the ConfigMap, the status or the Events.
    config_map = cluster.kube.get(namespaced("configmaps", namespace, f"{NAME}-spec"))
    events = cluster.kube.get(namespaced("events", namespace))["items"]
    for where, document in (("ConfigMap", config_map), ("status", get_tj(cluster, namespace)["status"]),
                            ("Events", events)):  # fmt: skip
        text = json.dumps(document)
        for name, value in secrets.items():
            assert value not in text, f"{name} leaked into the {where}"
    # It names the Secret, so the pods can reference it.
    assert json.loads(config_map["data"]["trainingjob.json"])["spec"]["storage"]["secretRef"] == "s3-creds"


def test_invalid_data_fails_without_a_restart_even_when_exit_1_is_retriable(
    cluster: ControlPlane, kiln_operator: OperatorProcess, namespace: str, s3_server: S3Server, s3_bucket: str
) -> None:
    """torchrun turns the trainer's exit 2 (invalid input) into 1; the termination message keeps the 2."""
    create_secret(cluster, namespace, s3_server)
    document = manifest(namespace, s3_bucket, s3_server)
    document["spec"]["data"]["train"]["uri"] = f"s3://{s3_bucket}/nothing/train"
    document["spec"]["runPolicy"] = {"maxRestarts": 2, "retriableExitCodes": [1], "terminationGracePeriodSeconds": 10}
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(document))

    tj, _ = watch_until_finished(cluster, namespace, timeout=120)
    assert tj["status"]["phase"] == "Failed", diagnostics(cluster, namespace, kiln_operator)
    status = tj["status"]
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "WorkerFailed", failed
    assert "holds no objects" in failed["message"] and "nothing/train" in failed["message"], failed
    assert "exited with code 1 (the trainer's exit code: 2)" in failed["message"], failed
    assert status["attempt"] == 1 and status["restarts"] == 0, status


def upload_shapes(s3: S3Server, bucket: str, tmp_path: Path) -> int:
    """Tiny synthetic shapes (32 px; 32 train and 8 val pairs) under s3://bucket/shapes/{train,val}/{images,masks}/."""
    local = write_shapes(tmp_path / "shapes", splits={"train": 32, "val": 8}, size=32)
    paths = sorted(local.rglob("*.png"))
    for path in paths:
        s3.client().upload_file(str(path), bucket, f"shapes/{path.relative_to(local).as_posix()}")
    return len(paths)


def test_segmentation_trainingjob_succeeds_with_miou_in_its_status(
    cluster: ControlPlane,
    kiln_operator: OperatorProcess,
    namespace: str,
    s3_server: S3Server,
    s3_bucket: str,
    tmp_path: Path,
) -> None:
    """The same two pods, now a segmentation task: a tiny smp U-Net on the shapes, validated by mIoU."""
    assert upload_shapes(s3_server, s3_bucket, tmp_path) == 80
    create_secret(cluster, namespace, s3_server)
    document = manifest(namespace, s3_bucket, s3_server, name=SHAPES)
    splits = {split: {"uri": f"s3://{s3_bucket}/shapes/{split}", "format": "segmentation-folder"} for split in
              ("train", "val")}  # fmt: skip
    document["spec"].update(
        task="segmentation",
        model={"architecture": "unet", "encoder": "tu-tf_mobilenetv3_small_minimal_100", "numClasses": 4},
        data={**splits, "imageSize": 32, "batchSize": 4, "workers": 0},
        validation={"every": 1, "metric": "miou"},
    )
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(document))

    tj, _ = watch_until_finished(cluster, namespace, timeout=240, name=SHAPES)
    assert tj["status"]["phase"] == "Succeeded", diagnostics(cluster, namespace, kiln_operator, SHAPES)
    status = tj["status"]
    assert status["workers"]["succeeded"] == 2, status
    progress = status["progress"]
    assert progress["epoch"] == 2 and progress["percent"] == 100.0, progress
    assert 0.0 <= progress["metrics"]["val/miou"] <= 1.0, progress
    assert {"val/pixel_accuracy", "val/iou/3", "train/loss/dice"} <= set(progress["metrics"]), progress
    assert progress["metric"].startswith("miou="), progress
    best = status["checkpoints"]["best"]
    assert best.startswith(f"s3://{s3_bucket}/runs/{SHAPES}/checkpoints/") and s3_exists(s3_server, best), status


DETECTION = "boxes"


def upload_detection_shapes(s3: S3Server, bucket: str, tmp_path: Path) -> int:
    """The detection generator's shapes (64 px; 16 train and 8 val images, COCO layout) under
    s3://bucket/boxes/{train,val}/."""
    from kiln.trainer.detection_shapes import write_detection_shapes

    local = write_detection_shapes(tmp_path / "boxes", splits={"train": 16, "val": 8}, size=64, formats=("coco",))
    paths = sorted(path for path in (local / "coco").rglob("*") if path.is_file())
    for path in paths:
        s3.client().upload_file(str(path), bucket, f"boxes/{path.relative_to(local / 'coco').as_posix()}")
    return len(paths)


def test_detection_trainingjob_succeeds_with_map_in_its_status(
    cluster: ControlPlane,
    kiln_operator: OperatorProcess,
    namespace: str,
    s3_server: S3Server,
    s3_bucket: str,
    tmp_path: Path,
) -> None:
    """The same two pods, now a detection task: a small torchvision Faster R-CNN on the shapes, validated by mAP."""
    assert upload_detection_shapes(s3_server, s3_bucket, tmp_path) == 26  # 24 images, 2 annotation files
    create_secret(cluster, namespace, s3_server)
    document = manifest(namespace, s3_bucket, s3_server, name=DETECTION)
    splits = {split: {"uri": f"s3://{s3_bucket}/boxes/{split}", "format": "coco"} for split in ("train", "val")}
    document["spec"].update(
        task="detection",
        model={"architecture": "fasterrcnn_mobilenet_v3_large_320_fpn", "args": {"box_score_thresh": 0.0}},
        data={**splits, "imageSize": 64, "batchSize": 4, "workers": 0},
        optimizer={"name": "sgd", "lr": 0.01},
        validation={"every": 1},  # the default metric: map
    )
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(document))

    tj, _ = watch_until_finished(cluster, namespace, timeout=240, name=DETECTION)
    assert tj["status"]["phase"] == "Succeeded", diagnostics(cluster, namespace, kiln_operator, DETECTION)
    status = tj["status"]
    assert status["workers"]["succeeded"] == 2, status
    progress = status["progress"]
    assert progress["epoch"] == 2 and progress["percent"] == 100.0, progress
    assert 0.0 <= progress["metrics"]["val/map"] <= 1.0, progress
    assert {"val/map50", "val/map75", "train/loss/classifier", "train/loss/objectness"} <= set(progress["metrics"])
    assert progress["metric"].startswith("map="), progress
    best = status["checkpoints"]["best"]
    assert best.startswith(f"s3://{s3_bucket}/runs/{DETECTION}/checkpoints/") and s3_exists(s3_server, best), status
