"""The generated CRDs on a real kube-apiserver: accepted as structural, explainable, and enforcing the same
rules with the same field paths as `kiln validate`."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from kiln.api import TrainingJob, parse_manifest
from kiln.testing.controlplane import ControlPlane
from kiln.testing.processes import wait_until
from tests.api.test_validate_cli import VALID

pytestmark = pytest.mark.controlplane

ROOT = Path(__file__).parents[2]


def apply(cluster: ControlPlane, namespace: str, document: dict[str, Any], *flags: str) -> tuple[int, str]:
    result = cluster.kubectl("apply", "-n", namespace, "-f", "-", *flags, input=json.dumps(document), check=False)
    return result.returncode, result.stdout + result.stderr


def test_crds_are_structural_and_established(cluster: ControlPlane, kiln_crds: None) -> None:
    for name in ("trainingjobs.kiln.dev", "exportjobs.kiln.dev"):
        crd = json.loads(cluster.kubectl("get", f"crd/{name}", "-o", "json").stdout)
        conditions = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
        assert conditions.get("Established") == "True"
        assert conditions.get("NonStructuralSchema", "False") == "False"


def test_kubectl_explain_shows_field_descriptions(cluster: ControlPlane, kiln_crds: None) -> None:
    # The apiserver publishes a new CRD's OpenAPI a moment after it is Established.
    wait_until(
        lambda: cluster.kubectl("explain", "trainingjob.spec.optimizer.lr", check=False).returncode == 0,
        timeout=30,
        what="the TrainingJob schema in the published OpenAPI",
    )
    explained = cluster.kubectl("explain", "trainingjob.spec.optimizer.lr").stdout
    assert "Peak learning rate, reached after warmup." in explained
    assert "Restarts, suspension, deadlines" in cluster.kubectl("explain", "tj.spec.runPolicy").stdout


@pytest.mark.parametrize("example", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_examples_pass_server_side_validation(
    cluster: ControlPlane, kiln_crds: None, namespace: str, example: Path
) -> None:
    code, output = apply(cluster, namespace, yaml.safe_load(example.read_text()), "--dry-run=server")
    assert code == 0, output


def keyframe(epoch: int, **weights: float) -> dict[str, Any]:
    return {"epoch": epoch, "weights": weights}


# The subset of the CLI's bad manifests that the schema or CEL can see: the apiserver must name the same field.
SERVER_SIDE_CASES = [
    ("epochs", -1, "spec.epochs"),
    ("precision", "fp8", "spec.precision"),
    ("optimizer", {"lr": -0.1}, "spec.optimizer.lr"),
    ("data", {"train": {"uri": "s3://x"}, "val": {"uri": "s3://y"}, "valSplit": 0.2}, "spec.data.valSplit"),
    ("data", {"train": {"uri": "s3://bucket/x", "format": "coco"}}, "spec.data.train.format"),
    ("loss", {"name": "focal", "weights": {"dice": 1}}, "spec.loss.weights"),
    ("loss", {"name": "focal", "schedule": [{"epoch": 0, "weights": {"focal": 1}}]}, "spec.loss.schedule"),
    ("loss", {"schedule": [keyframe(4, dice=1), keyframe(2, dice=0)]}, "spec.loss.schedule"),  # decreasing
    ("loss", {"schedule": [keyframe(2, dice=1), keyframe(2, dice=0)]}, "spec.loss.schedule"),  # repeated
    ("loss", {"schedule": [keyframe(0, dice=1), keyframe(2, focal=1)]}, "spec.loss.schedule"),  # other terms
    ("model", {"architecture": "resnet18", "pretrained": "imagenet"}, "spec.model.pretrained"),
    ("runPolicy", {"retriableExitCodes": [300]}, "spec.runPolicy.retriableExitCodes[0]"),
    ("data", {"train": {"uri": "ftp://host/x"}}, "spec.data.train.uri"),
    ("storage", {"endpointUrl": "not a url"}, "spec.storage.endpointUrl"),
    ("augmentation", {"mixup": 0.2}, "spec.data.batchSize"),
    ("model", {"architecture": "resnet18", "encoder": "resnet34"}, "spec.model.encoder"),
    ("data", {"train": {"uri": "s3://bucket/x"}, "palette": [[0, 0, 0], [9, 9, 9]]}, "spec.data.palette"),
    ("loss", {"classWeights": "balanced"}, "spec.loss.classWeights"),
    ("model", {"architecture": "resnet18", "freezeEncoder": {"epochs": 1}}, "spec.model.freezeEncoder"),
    ("model", {"architecture": "resnet18", "freezeBackbone": {"epochs": 10}}, "spec.model.freezeBackbone.epochs"),
    ("model", {"architecture": "resnet18", "backboneLrScale": 0}, "spec.model.backboneLrScale"),
]


@pytest.mark.parametrize(("field", "value", "path"), SERVER_SIDE_CASES, ids=[c[2] for c in SERVER_SIDE_CASES])
def test_apiserver_rejects_with_the_field_path(
    cluster: ControlPlane, kiln_crds: None, namespace: str, field: str, value: Any, path: str
) -> None:
    document = copy.deepcopy(VALID)
    document["spec"][field] = value
    code, output = apply(cluster, namespace, document, "--dry-run=server")
    assert code != 0
    assert path in output, output


def test_a_loss_schedule_passes_the_rules_kiln_validate_passes(
    cluster: ControlPlane, kiln_crds: None, namespace: str
) -> None:
    document = copy.deepcopy(VALID)
    document["spec"]["loss"] = {"schedule": [keyframe(0, cross_entropy=1.0), keyframe(5, cross_entropy=0.5)]}
    parse_manifest(document)
    code, output = apply(cluster, namespace, document, "--dry-run=server")
    assert code == 0, output


def test_model_args_and_a_freeze_are_stored_and_updates_compare_them(
    cluster: ControlPlane, kiln_crds: None, namespace: str
) -> None:
    """model.args is free-form (preserve-unknown-fields): kept verbatim, and the immutability rule on model
    (self.model == oldSelf.model) still compares it when the object is updated."""
    document = copy.deepcopy(VALID)
    model = {"architecture": "resnet18", "args": {"drop_rate": 0.2, "block_args": {"attn_layer": "se"}}}
    document["spec"].update(model={**model, "freezeBackbone": {"epochs": 2}, "backboneLrScale": 0.1}, epochs=5)
    parse_manifest(document)
    code, output = apply(cluster, namespace, document)
    assert code == 0, output
    stored = json.loads(cluster.kubectl("get", "-n", namespace, "trainingjob/digits", "-o", "json").stdout)
    assert stored["spec"]["model"]["args"] == model["args"]
    document["spec"]["epochs"] = 6  # model unchanged: allowed
    code, output = apply(cluster, namespace, document)
    assert code == 0, output
    document["spec"]["model"]["args"]["drop_rate"] = 0.3
    code, output = apply(cluster, namespace, document)
    assert code != 0 and "model is immutable" in output, output


SEGMENTATION = {
    "task": "segmentation",
    "model": {"architecture": "unet", "encoder": "resnet34", "numClasses": 3},
    "data": {"train": {"uri": "s3://bucket/train", "format": "segmentation-folder"}},
}
PALETTE = [[0, 0, 0], [255, 0, 0], [0, 255, 0]]
# What the agreement test's generator leaves out: classWeights is untyped in the schema (a list, or auto, which
# a structural schema can only say with anyOf over untyped branches), and palette is a set of lists.
UNIONS_AND_SETS = [
    ({"loss": {"classWeights": "auto"}}, True),
    ({"loss": {"classWeights": [1, 2.5, 0]}}, True),
    ({"loss": {"classWeights": []}}, True),
    ({"loss": {"classWeights": "balanced"}}, False),
    ({"loss": {"classWeights": ""}}, False),
    ({"loss": {"classWeights": [-1, 1, 1]}}, False),
    ({"loss": {"classWeights": ["x"]}}, False),
    ({"loss": {"classWeights": {"auto": 1}}}, False),
    ({"loss": {"classWeights": 3}}, False),
    ({"loss": {"classWeights": True}}, False),
    ({"data": {**SEGMENTATION["data"], "palette": PALETTE, "ignoreColor": [9, 9, 9]}}, True),
    ({"data": {**SEGMENTATION["data"], "palette": PALETTE[:2]}}, False),
    ({"data": {**SEGMENTATION["data"], "palette": [[0, 0, 0], [7, 7, 7], [0, 0, 0]]}}, False),
    ({"data": {**SEGMENTATION["data"], "palette": [[0, 0, 0], [7, 7, 256], [1, 1, 1]]}}, False),
    ({"data": {**SEGMENTATION["data"], "palette": PALETTE, "ignoreColor": [0, 0, 0]}}, False),
    ({"data": {**SEGMENTATION["data"], "ignoreColor": [9, 9, 9]}}, False),
]


@pytest.mark.parametrize(("change", "accepted"), UNIONS_AND_SETS, ids=lambda v: json.dumps(v)[:60])
def test_the_apiserver_and_the_models_agree_on_class_weights_and_palettes(
    cluster: ControlPlane, kiln_crds: None, namespace: str, change: dict[str, Any], accepted: bool
) -> None:
    document = copy.deepcopy(VALID)
    document["spec"] = {**copy.deepcopy(SEGMENTATION), **copy.deepcopy(change)}
    code, output = apply(cluster, namespace, document, "--dry-run=server")
    assert (code == 0) == accepted, output
    try:
        TrainingJob.model_validate(document)
    except ValidationError as error:
        assert not accepted, error
    else:
        assert accepted, "the models accept what the apiserver refuses"


def test_unknown_fields_are_rejected_with_strict_validation(
    cluster: ControlPlane, kiln_crds: None, namespace: str
) -> None:
    document = copy.deepcopy(VALID)
    document["spec"]["optimzer"] = {"lr": 0.1}
    code, output = apply(cluster, namespace, document, "--validate=strict", "--dry-run=server")
    assert code != 0
    assert "optimzer" in output


def test_apiserver_defaults_agree_with_the_models(cluster: ControlPlane, kiln_crds: None, namespace: str) -> None:
    code, output = apply(cluster, namespace, VALID)
    assert code == 0, output
    stored = json.loads(cluster.kubectl("get", "-n", namespace, "tj/digits", "-o", "json").stdout)
    assert stored["spec"]["optimizer"]["name"] == "adamw"
    assert stored["spec"]["data"]["staging"]["mode"] == "auto"
    from_server = parse_manifest({k: stored[k] for k in ("apiVersion", "kind", "metadata", "spec")})
    from_models = parse_manifest(VALID)
    assert isinstance(from_server, TrainingJob) and isinstance(from_models, TrainingJob)
    assert from_server.spec == from_models.spec


def test_identity_fields_are_immutable_but_run_policy_is_not(
    cluster: ControlPlane, kiln_crds: None, namespace: str
) -> None:
    assert apply(cluster, namespace, VALID)[0] == 0
    for patch, message in (
        ({"task": "detection", "data": {"train": {"uri": "s3://bucket/x", "format": "coco"}}}, "task is immutable"),
        ({"model": {"architecture": "resnet50"}}, "model is immutable"),
        ({"resources": {"nodes": 4}}, "resources.nodes is immutable"),
    ):
        result = cluster.kubectl(
            "patch", "-n", namespace, "tj/digits", "--type=merge", "-p", json.dumps({"spec": patch}), check=False
        )
        assert result.returncode != 0
        assert message in result.stderr, result.stderr
    result = cluster.kubectl(
        "patch", "-n", namespace, "tj/digits", "--type=merge", "-p", '{"spec": {"runPolicy": {"maxRestarts": 7}}}'
    )
    assert result.returncode == 0
    stored = json.loads(cluster.kubectl("get", "-n", namespace, "tj/digits", "-o", "json").stdout)
    assert stored["spec"]["runPolicy"]["maxRestarts"] == 7


def test_locations_and_image_are_immutable_whether_set_or_not(
    cluster: ControlPlane, kiln_crds: None, namespace: str
) -> None:
    document = copy.deepcopy(VALID)
    document["spec"]["checkpoint"] = {"uri": "s3://ckpt/digits"}  # set; output.uri and image left unset
    assert apply(cluster, namespace, document)[0] == 0
    for patch, message in (
        ({"checkpoint": {"uri": "s3://elsewhere/digits"}}, "checkpoint.uri is immutable"),
        ({"checkpoint": {"uri": None}}, "checkpoint.uri is immutable"),
        ({"output": {"uri": "s3://out/digits"}}, "output.uri is immutable"),
        ({"image": "kiln/trainer:other"}, "image is immutable"),
    ):
        result = cluster.kubectl(
            "patch", "-n", namespace, "tj/digits", "--type=merge", "-p", json.dumps({"spec": patch}), check=False
        )
        assert result.returncode != 0, patch
        assert message in result.stderr, result.stderr
    # What may change still can: the optimizer (at the next attempt) and the checkpoint cadence.
    patch = {"spec": {"optimizer": {"lr": 0.01}, "checkpoint": {"everyEpochs": 2}}}
    cluster.kubectl("patch", "-n", namespace, "tj/digits", "--type=merge", "-p", json.dumps(patch))


def test_name_rule(cluster: ControlPlane, kiln_crds: None, namespace: str) -> None:
    document = copy.deepcopy(VALID)
    document["metadata"]["name"] = "n" * 45
    code, output = apply(cluster, namespace, document, "--dry-run=server")
    assert code != 0
    assert "at most 40 characters" in output


def test_printer_columns(cluster: ControlPlane, kiln_crds: None, namespace: str) -> None:
    assert apply(cluster, namespace, VALID)[0] == 0
    header = cluster.kubectl("get", "-n", namespace, "tj").stdout.splitlines()[0].split()
    assert header == ["NAME", "PHASE", "TASK", "MODEL", "EPOCH", "METRIC", "AGE"]
    assert "digits" in cluster.kubectl("get", "kiln", "-n", namespace).stdout
