"""The name catalogue: generated from the trainer, current, in step with its registries, and behind the name
checks that `kiln validate`, `kiln run` and the operator run (parse_manifest), so a typo fails where the user is."""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from pathlib import Path
from typing import Any, get_args

import pytest
from typer.testing import CliRunner

from kiln.api import InvalidManifest, parse_manifest
from kiln.api.catalogue import Catalogue, TransformArgs, load_catalogue
from kiln.api.crd import KINDS, crd
from kiln.api.data import FORMATS_BY_TASK, AugmentationPreset, Task, Transform
from kiln.api.learning import SchedulerName
from kiln.api.manifest import TrainingJob
from kiln.api.resolve import TASK_DEFAULTS, Environment, resolve
from kiln.cli import EXIT_FAILED, app
from kiln.trainer.augment import PRESETS, transforms_registry
from kiln.trainer.models import MODELS
from kiln.trainer.optim import OPTIMIZERS, SCHEDULERS
from kiln.trainer.tasks import TASKS
from kiln.trainer.tasks.classification import LOSSES, ClassificationEvaluator
from kiln.trainer.tasks.classification_data import FORMATS
from kiln.trainer.tasks.segmentation import LOSSES as SEGMENTATION_LOSSES
from kiln.trainer.tasks.segmentation import SegmentationEvaluator
from kiln.trainer.tasks.segmentation_data import FORMATS as SEGMENTATION_FORMATS

SPEC: dict[str, Any] = {
    "task": "classification",
    "model": {"architecture": "resnet18"},
    "data": {"train": {"uri": "s3://bucket/train"}, "val": {"uri": "s3://bucket/val"}},
}
SEGMENTATION = {
    "task": "segmentation",
    "model": {"architecture": "unet", "encoder": "resnet34", "numClasses": 3},
    "data": {"train": {"uri": "s3://bucket/train", "format": "segmentation-folder"}},
}
DETECTION = {
    "task": "detection",
    "model": {"architecture": "fasterrcnn_resnet50_fpn_v2"},
    "data": {"train": {"uri": "s3://bucket/train", "format": "coco"}},
}


def document(spec: dict[str, Any] | None = None, **changes: Any) -> dict[str, Any]:
    return {
        "apiVersion": "kiln.dev/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {"name": "names"},
        "spec": {**copy.deepcopy(spec or SPEC), **changes},
    }


def errors(spec: dict[str, Any] | None = None, **changes: Any) -> list[str]:
    """The 'field: reason' lines parse_manifest reports, or [] when the manifest is valid."""
    try:
        parse_manifest(document(spec, **changes))
    except InvalidManifest as exc:
        return [f"{error.field}: {error.reason}" for error in exc.errors]
    return []


@pytest.fixture
def patched(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Replace the catalogue behind the checks with a variant of the committed one."""

    def patch(**changes: Any) -> None:
        variant = dataclasses.replace(load_catalogue(), **changes)
        monkeypatch.setattr("kiln.api.semantics.load_catalogue", lambda: variant)

    return patch


# --- the catalogue itself ---------------------------------------------------------------------------------------


def test_catalogue_is_package_data_loaded_once() -> None:
    catalogue = load_catalogue()
    assert catalogue is load_catalogue()
    assert {"timm", "albumentations", "segmentation-models-pytorch", "torchvision", "torch"} <= set(catalogue.versions)
    assert "resnet18" in catalogue.architectures["classification"]
    assert "unet" in catalogue.architectures["segmentation"]
    assert "fasterrcnn_resnet50_fpn_v2" in catalogue.architectures["detection"]


def test_stale_catalogue_fails_the_check(tmp_path: Path) -> None:
    path = tmp_path / "catalogue.json"
    args = ["crds", "-o", str(tmp_path / "crds"), "--docs", str(tmp_path / "api.md"), "--catalogue", str(path)]
    assert CliRunner().invoke(app, args).exit_code == 0
    assert json.loads(path.read_text())["optimizers"]["adamw"] == {"betas": True, "momentum": False}
    edited = json.loads(path.read_text())
    del edited["optimizers"]["adamw"]
    path.write_text(json.dumps(edited, indent=1, sort_keys=True) + "\n")
    result = CliRunner().invoke(app, [*args, "--check"])
    assert result.exit_code == EXIT_FAILED
    stale = [line for line in result.output.splitlines() if line.startswith("stale")]
    assert len(stale) == 1 and "catalogue.json" in stale[0], result.output


def test_inline_transform_keys_survive_the_apiserver() -> None:
    spec = crd(KINDS[0])["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    transform = spec["properties"]["augmentation"]["properties"]["transforms"]["items"]
    assert transform["x-kubernetes-preserve-unknown-fields"] is True
    assert set(transform["properties"]) == {"name", "args"}


# --- the trainer's registries and the API agree with it --------------------------------------------------------


def test_optimizers_match_the_trainer_registry() -> None:
    catalogue = load_catalogue()
    assert set(catalogue.optimizers) == set(OPTIMIZERS.names())
    for info in OPTIMIZERS:
        if info.cls is not None:
            assert catalogue.optimizers[info.name].momentum == info.has_momentum, info.name
            assert catalogue.optimizers[info.name].betas == info.has_betas, info.name


def test_tasks_formats_losses_and_metrics_match_the_trainer() -> None:
    catalogue = load_catalogue()
    assert set(catalogue.tasks) == set(TASKS.names())
    assert set(catalogue.tasks) <= set(get_args(Task))
    classification = catalogue.tasks["classification"]
    assert set(classification.formats) == set(FORMATS.names())
    assert set(classification.formats) <= set(FORMATS_BY_TASK["classification"])
    assert set(classification.losses) == set(LOSSES.names())
    assert set(classification.metrics) == set(ClassificationEvaluator.metric_names)
    segmentation = catalogue.tasks["segmentation"]
    assert set(segmentation.formats) == set(SEGMENTATION_FORMATS.names()) == set(FORMATS_BY_TASK["segmentation"])
    assert set(segmentation.losses) == set(SEGMENTATION_LOSSES.names())
    assert set(segmentation.metrics) == set(SegmentationEvaluator.METRICS)
    for name, task in catalogue.tasks.items():
        assert task.default_metric in task.metrics, name
        assert set(TASK_DEFAULTS[name].loss) <= set(task.losses), name


def test_models_schedulers_presets_and_transforms_match_the_trainer() -> None:
    catalogue = load_catalogue()
    assert catalogue.kiln_flavors == set(MODELS.names())
    assert catalogue.kiln_flavors <= catalogue.architectures["classification"]
    assert set(catalogue.schedulers) == set(SCHEDULERS.names()) == set(get_args(SchedulerName))
    assert set(catalogue.presets) == set(PRESETS.names()) == set(get_args(AugmentationPreset))
    assert set(catalogue.transforms) == set(transforms_registry().names())


@pytest.mark.parametrize("preset", PRESETS.names())
def test_every_preset_passes_the_transform_checks(preset: str) -> None:
    # The presets are written by hand in the trainer; the catalogue's signatures must accept them.
    transforms = [t.to_dict() for t in PRESETS.get(preset).transforms(224)]
    assert errors(augmentation={"transforms": transforms}) == []


# --- the checks ------------------------------------------------------------------------------------------------


def test_a_misspelt_optimizer_gets_the_closest_names() -> None:
    [line] = errors(optimizer={"name": "adamx"})
    assert line.startswith("spec.optimizer.name: unknown optimizer 'adamx'; did you mean ")
    assert re.search(r"did you mean [^?]*\badamw\b[^?]*\?", line), line


def test_a_timm_optimizer_is_accepted() -> None:
    assert errors(optimizer={"name": "lamb"}) == []


def test_an_unknown_timm_architecture_is_refused() -> None:
    [line] = errors(model={"architecture": "resnet1000"})
    assert line.startswith("spec.model.architecture: unknown classification architecture 'resnet1000'; did you mean")


@pytest.mark.parametrize("architecture", ["debug", "convnext_tiny", "resnet50.a1_in1k"])
def test_flavors_timm_names_and_pretrained_tags_are_accepted(architecture: str) -> None:
    assert errors(model={"architecture": architecture}) == []


def test_a_plugin_names_any_architecture() -> None:
    assert errors(model={"architecture": "my-net", "source": "my_models.nets:build"}) == []


def test_unimplemented_tasks_are_refused_in_one_line(patched: Any) -> None:
    patched(tasks={name: names for name, names in load_catalogue().tasks.items() if name != "detection"})
    assert errors(DETECTION) == [
        "spec.task: detection is not implemented yet; implemented: classification, segmentation"
    ]


def test_detection_names_are_checked() -> None:
    assert errors(DETECTION) == []
    model = {"architecture": "fasterrcnn_resnet50_fpn_v3"}
    [line] = errors(DETECTION, model=model)
    assert line.startswith("spec.model.architecture: unknown detection architecture 'fasterrcnn_resnet50_fpn_v3'")
    assert "did you mean fasterrcnn_resnet50_fpn_v2" in line
    args = {"box_score_tresh": 0.1, "min_size": 320, "num_classes": 3}
    lines = errors(DETECTION, model={**DETECTION["model"], "args": args})
    assert lines[0] == "spec.model.args.num_classes: set by model.numClasses; Kiln passes it to the constructor"
    assert lines[1].startswith("spec.model.args.box_score_tresh: unknown fasterrcnn_resnet50_fpn_v2 argument")
    assert "did you mean box_score_thresh" in lines[1] and len(lines) == 2
    [line] = errors(DETECTION, validation={"metric": "map_50"})
    assert line.startswith("spec.validation.metric: unknown detection metric 'map_50'; did you mean map50")
    [line] = errors(DETECTION, loss={"classWeights": [1.0, 2.0]})
    assert line.startswith("spec.loss.classWeights: detection trains with the detector's own losses")


def test_an_unimplemented_format_is_refused(patched: Any) -> None:
    only_folders = dataclasses.replace(load_catalogue().tasks["classification"], formats=("imagefolder",))
    patched(tasks={"classification": only_folders})
    train = {"uri": "s3://bucket/train", "format": "csv"}
    [line] = errors(data={**SPEC["data"], "train": train})
    assert line == "spec.data.train.format: csv is not implemented yet for classification; implemented: imagefolder"


def test_segmentation_architectures_and_encoders() -> None:
    for encoder in ("resnet34", "tu-resnet18", "tu-convnext_tiny"):
        assert errors(SEGMENTATION, model={"architecture": "UNet", "encoder": encoder, "numClasses": 3}) == [], encoder
    bad = errors(SEGMENTATION, model={"architecture": "unet3", "encoder": "tu-resnet1000", "numClasses": 3})
    assert bad[0].startswith("spec.model.architecture: unknown segmentation architecture 'unet3'")
    assert bad[1].startswith("spec.model.encoder: unknown segmentation encoder")
    assert errors(SEGMENTATION, model={"architecture": "unet", "encoder": "resnet343", "numClasses": 3})[0].startswith(
        "spec.model.encoder: unknown segmentation encoder"
    )


def test_unknown_losses_are_refused() -> None:
    assert errors(loss={"name": "focal"}) == [
        "spec.loss.name: unknown classification loss 'focal'; valid: cross_entropy"
    ]
    [line] = errors(loss={"weights": {"cross_entropy": 1.0, "dice": 1.0}})
    assert line.startswith("spec.loss.weights.dice: unknown classification loss 'dice'")


def test_metrics_come_from_the_catalogue() -> None:
    assert errors(validation={"metric": "val/f1"}) == []
    [line] = errors(earlyStopping={"metric": "accuracyy"}, validation={"metric": "accuracy"})
    assert line.startswith("spec.earlyStopping.metric: unknown classification metric 'accuracyy'")
    assert "did you mean accuracy?" in line


def test_an_unknown_transform_is_refused() -> None:
    [line] = errors(augmentation={"transforms": [{"name": "HorizontalFlipp"}]})
    assert line.startswith("spec.augmentation.transforms[0].name: unknown albumentations transform 'HorizontalFlipp'")
    assert "did you mean HorizontalFlip" in line


def test_an_unknown_transform_argument_is_refused() -> None:
    transforms = [{"name": "Affine", "rotate": [-15, 15]}, {"name": "HorizontalFlip", "probability": 0.5}]
    assert errors(augmentation={"transforms": transforms}) == [
        "spec.augmentation.transforms[1]: unknown HorizontalFlip argument 'probability'; valid: p"
    ]


def test_a_transform_taking_kwargs_accepts_any_argument(patched: Any) -> None:
    transforms = dict(load_catalogue().transforms)
    transforms["HorizontalFlip"] = TransformArgs(frozenset({"p"}), var_kwargs=True)
    patched(transforms=transforms)
    assert errors(augmentation={"transforms": [{"name": "HorizontalFlip", "probability": 0.5}]}) == []


def test_inline_transform_arguments_mean_args() -> None:
    inline = Transform.model_validate({"name": "HorizontalFlip", "p": 0.5})
    assert inline == Transform.model_validate({"name": "HorizontalFlip", "args": {"p": 0.5}})
    assert inline.to_dict() == {"name": "HorizontalFlip", "args": {"p": 0.5}}
    # What the apiserver stores: inline keys kept (preserve-unknown-fields), args defaulted to {}.
    assert Transform.model_validate({"name": "HorizontalFlip", "p": 0.5, "args": {}}) == inline
    assert errors(augmentation={"transforms": [{"name": "ColorJitter", "brightness": 0.2, "p": 0.5}]}) == []


def test_inline_and_args_together_are_refused() -> None:
    transforms = [{"name": "HorizontalFlip", "p": 0.5, "args": {"p": 1.0}}]
    assert errors(augmentation={"transforms": transforms}) == [
        "spec.augmentation.transforms[0].args: give the transform's arguments inline or under args, not both"
        " (inline: p)"
    ]


def test_catalogue_round_trips_its_json() -> None:
    text = Path(__file__).parents[2].joinpath("kiln/api/catalogue.json").read_text()
    assert Catalogue.from_json(json.loads(text)) == load_catalogue()


def test_segmentation_is_implemented_with_its_defaults() -> None:
    assert errors(SEGMENTATION) == []
    csv_data = {"train": {"uri": "s3://bucket/train.csv", "format": "csv"}, "valSplit": 0.2, "ignoreIndex": 255}
    assert errors(SEGMENTATION, data=csv_data, loss={"weights": {"lovasz": 1.0, "focal": 1.0}}) == []
    assert errors(SEGMENTATION, validation={"metric": "val/pixel_accuracy"}) == []


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"model": {"architecture": "unet", "encoder": "resnet34"}}, "spec.model.numClasses: segmentation needs"),
        ({"loss": {"name": "bce"}}, "spec.loss: bce is binary cross-entropy: it needs model.numClasses 1"),
        ({"loss": {"name": "lovasz", "classWeights": [1, 2, 3]}}, "spec.loss.classWeights: lovasz takes no class"),
        (
            {"model": {**SEGMENTATION["model"], "numClasses": 1}, "loss": {"classWeights": [1]}},
            "spec.loss.classWeights: binary segmentation (numClasses 1) takes no class weights",
        ),
        ({"loss": {"name": "dice"}, "augmentation": {"labelSmoothing": 0.1}}, "spec.augmentation.labelSmoothing"),
        ({"data": {**SEGMENTATION["data"], "ignoreIndex": 2}}, "spec.data.ignoreIndex: data.ignoreIndex must not"),
        ({"loss": {"name": "softmax_dice"}}, "spec.loss.name: unknown segmentation loss 'softmax_dice'"),
        (
            {"loss": {"schedule": [{"epoch": 0, "weights": {"bce": 1.0, "dice": 0.0}}]}},
            "spec.loss: bce is binary cross-entropy",  # a scheduled term counts as much as a weighted one
        ),
        (
            {"loss": {"schedule": [{"epoch": 0, "weights": {"dice": 1.0, "softmax_dice": 0.0}}]}},
            "spec.loss.schedule[0].weights.softmax_dice: unknown segmentation loss",
        ),
        ({"validation": {"metric": "iou/1"}}, "spec.validation.metric: unknown segmentation metric"),
    ],
)
def test_segmentation_options_it_would_ignore_are_refused(changes: dict[str, Any], expected: str) -> None:
    found = errors(SEGMENTATION, **changes)
    assert any(line.startswith(expected) for line in found), found


def test_ignore_index_is_for_segmentation_and_resolved_to_255() -> None:
    [line] = errors(data={**SPEC["data"], "ignoreIndex": 255})
    assert line.startswith("spec.data.ignoreIndex: data.ignoreIndex applies to segmentation masks only")
    job = parse_manifest(document(SEGMENTATION))
    assert isinstance(job, TrainingJob)
    assert resolve(job, Environment(storage_root="/tmp")).spec.data.ignore_index == 255


PALETTE = [[0, 0, 0], [255, 0, 0], [0, 255, 0]]  # one colour per class of SEGMENTATION's 3


def test_palette_is_for_segmentation_and_named_in_the_error() -> None:
    [line] = errors(data={**SPEC["data"], "palette": PALETTE})
    assert line == "spec.data.palette: data.palette maps mask colours to classes: it applies to segmentation only"
    assert errors(SEGMENTATION, data={**SEGMENTATION["data"], "palette": PALETTE, "ignoreColor": [9, 9, 9]}) == []


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"palette": PALETTE[:2]}, "spec.data.palette: data.palette needs one colour per class"),
        ({"palette": [[0, 0, 0], [7, 7, 7], [0, 0, 0]]}, "spec.data.palette: colours must be distinct: [0, 0, 0]"),
        ({"palette": [[0, 0, 0], [7, 7], [1, 1, 1]]}, "spec.data.palette[1]: List should have at least 3 items"),
        ({"ignoreColor": [9, 9, 9]}, "spec.data.ignoreColor: ignoreColor names a colour of colour masks: it needs"),
        ({"palette": PALETTE, "ignoreColor": [255, 0, 0]}, "spec.data.ignoreColor: ignoreColor is one of the"),
    ],
)
def test_bad_palettes_are_refused_naming_the_field(data: dict[str, Any], expected: str) -> None:
    found = errors(SEGMENTATION, data={**SEGMENTATION["data"], **data})
    assert len(found) == 1 and found[0].startswith(expected), found


def test_a_binary_palette_has_two_colours() -> None:
    binary = {**SEGMENTATION, "model": {**SEGMENTATION["model"], "numClasses": 1}}
    assert errors(binary, data={**SEGMENTATION["data"], "palette": PALETTE[:2]}) == []
    assert errors(binary, data={**SEGMENTATION["data"], "palette": PALETTE})[0].startswith("spec.data.palette:")


@pytest.mark.parametrize(
    ("weights", "expected"),
    [
        ("auto", None),
        ([1.0, 2, 0.5], None),
        ("balanced", "spec.loss.classWeights: Input should be 'auto'"),
        ({"a": 1}, "spec.loss.classWeights: must be a list of per-class weights, or auto"),
        ([1, -1, 1], "spec.loss.classWeights[1]: Input should be greater than or equal to 0"),
        ([1, 2], "spec.loss.classWeights: has 2 entries but model.numClasses is 3"),
    ],
)
def test_class_weights_are_a_list_or_auto_with_one_line_per_problem(weights: Any, expected: str | None) -> None:
    found = errors(SEGMENTATION, loss={"classWeights": weights})
    assert found == ([] if expected is None else [found[0]]) and (expected is None or found[0].startswith(expected))


def test_auto_class_weights_are_refused_where_weights_are() -> None:
    binary = {**SEGMENTATION, "model": {**SEGMENTATION["model"], "numClasses": 1}}
    [line] = errors(binary, loss={"classWeights": "auto"})
    assert line == "spec.loss.classWeights: binary segmentation (numClasses 1) takes no class weights"
    assert errors(loss={"classWeights": "auto"}) == []  # classification: counts come from the listing
