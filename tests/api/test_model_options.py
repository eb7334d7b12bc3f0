"""model.args and transfer learning in the API: the schema keeps args verbatim, CEL-twinned rules keep each task's
transfer fields to that task, and the semantic checks refuse args the constructor would not take before a pod
starts, one line per problem naming model.args.<key>."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from kiln.api import InvalidManifest, parse_manifest
from kiln.api.crd import KINDS, crd

CLASSIFICATION: dict[str, Any] = {
    "task": "classification",
    "model": {"architecture": "resnet18"},
    "data": {"train": {"uri": "s3://bucket/train"}, "val": {"uri": "s3://bucket/val"}},
    "epochs": 10,
}
SEGMENTATION: dict[str, Any] = {
    "task": "segmentation",
    "model": {"architecture": "unet", "encoder": "resnet34", "numClasses": 3},
    "data": {"train": {"uri": "s3://bucket/train", "format": "segmentation-folder"}},
    "epochs": 10,
}
PRESENCE = {"weights": {"dice": 0.5, "cross_entropy": 0.5, "presence": 0.2}}


def errors(base: dict[str, Any], model: dict[str, Any] | None = None, **changes: Any) -> list[str]:
    """The 'field: reason' lines parse_manifest reports for base with ``model`` merged into its model."""
    spec = copy.deepcopy(base)
    spec["model"].update(model or {})
    spec.update(changes)
    document = {"apiVersion": "kiln.dev/v1alpha1", "kind": "TrainingJob", "metadata": {"name": "m"}, "spec": spec}
    try:
        parse_manifest(document)
    except InvalidManifest as exc:
        return [f"{error.field}: {error.reason}" for error in exc.errors]
    return []


def test_args_are_kept_verbatim_by_the_apiserver() -> None:
    schema = crd(KINDS[0])["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    args = schema["properties"]["model"]["properties"]["args"]
    assert args["type"] == "object" and args["x-kubernetes-preserve-unknown-fields"] is True


@pytest.mark.parametrize(
    ("base", "model"),
    [
        (CLASSIFICATION, {"args": {"drop_rate": 0.2, "drop_path_rate": 0.1}}),  # timm's kwargs: the trainer checks
        (CLASSIFICATION, {"freezeBackbone": {"epochs": 3}, "backboneLrScale": 0.1}),
        (CLASSIFICATION, {"backboneLrScale": 1.0}),
        (SEGMENTATION, {"args": {"decoder_channels": [128, 64, 32, 16, 8], "decoder_attention_type": "scse"}}),
        (SEGMENTATION, {"encoder": "tu-resnet18", "args": {"drop_path_rate": 0.1}}),  # a timm encoder takes more
        (SEGMENTATION, {"freezeEncoder": {"epochs": 9}, "encoderLrScale": 0.5}),
        (CLASSIFICATION, {"architecture": "mine", "source": "pkg.nets:build", "args": {"anything": [1, 2]}}),
    ],
)
def test_valid_options_are_accepted(base: dict[str, Any], model: dict[str, Any]) -> None:
    assert errors(base, model) == []


def test_the_auxiliary_head_comes_with_the_presence_loss() -> None:
    aux = {"args": {"aux_params": {"dropout": 0.2}}}
    assert errors(SEGMENTATION, aux, loss=PRESENCE) == []
    [line] = errors(SEGMENTATION, aux)
    assert line.startswith("spec.model.args.aux_params: the classification head learns from the presence loss")
    [line] = errors(SEGMENTATION, loss=PRESENCE)
    assert line == "spec.loss: presence trains smp's classification head: set model.args.aux_params"


@pytest.mark.parametrize(
    ("base", "model", "expected"),
    [
        (CLASSIFICATION, {"args": {"num_classes": 5}}, "spec.model.args.num_classes: set by model.numClasses"),
        (CLASSIFICATION, {"args": {"pretrained": True}}, "spec.model.args.pretrained: set by model.pretrained"),
        (SEGMENTATION, {"args": {"encoder_name": "resnet50"}}, "spec.model.args.encoder_name: set by model.encoder"),
        (SEGMENTATION, {"args": {"classes": 2}}, "spec.model.args.classes: set by model.numClasses"),
        (
            SEGMENTATION,
            {"args": {"decoder_chanels": [8] * 5}},
            "spec.model.args.decoder_chanels: unknown unet argument 'decoder_chanels'; did you mean decoder_channels",
        ),
        (SEGMENTATION, {"args": {"activation": "softmax2d"}}, "spec.model.args.activation: Kiln's losses and metrics"),
        (
            SEGMENTATION,
            {"args": {"aux_params": {"classes": 3}}},
            "spec.model.args.aux_params.classes: set by model.numClasses",
        ),
    ],
)
def test_args_the_constructor_would_not_take_are_refused(base: dict[str, Any], model: dict[str, Any], expected: str
                                                         ) -> None:  # fmt: skip
    found = errors(base, model, **({"loss": PRESENCE} if "aux_params" in model.get("args", {}) else {}))
    assert any(line.startswith(expected) for line in found), found
    assert len(found) == 1, found


@pytest.mark.parametrize(
    ("base", "model", "expected"),
    [
        (
            CLASSIFICATION,
            {"freezeEncoder": {"epochs": 2}},
            "spec.model.freezeEncoder: model.freezeEncoder applies to segmentation only; classification uses "
            "model.freezeBackbone and model.backboneLrScale",
        ),
        (CLASSIFICATION, {"encoderLrScale": 0.1}, "spec.model.encoderLrScale: model.encoderLrScale applies to"),
        (SEGMENTATION, {"freezeBackbone": {"epochs": 2}}, "spec.model.freezeBackbone: model.freezeBackbone applies"),
        (SEGMENTATION, {"backboneLrScale": 0.1}, "spec.model.backboneLrScale: model.backboneLrScale applies to"),
        (
            SEGMENTATION,
            {"freezeEncoder": {"epochs": 10}},
            "spec.model.freezeEncoder.epochs: model.freezeEncoder.epochs must be less than epochs",
        ),
        (CLASSIFICATION, {"freezeBackbone": {"epochs": 12}}, "spec.model.freezeBackbone.epochs: model.freezeBackbone"),
        (CLASSIFICATION, {"freezeBackbone": {"epochs": 0}}, "spec.model.freezeBackbone.epochs"),
        (SEGMENTATION, {"encoderLrScale": 0.0}, "spec.model.encoderLrScale"),
        (CLASSIFICATION, {"backboneLrScale": 1.5}, "spec.model.backboneLrScale"),
    ],
)
def test_transfer_fields_belong_to_their_task(base: dict[str, Any], model: dict[str, Any], expected: str) -> None:
    [line] = errors(base, model)
    assert line.startswith(expected), line
