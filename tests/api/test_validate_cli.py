"""`kiln validate` on good and bad manifests: one line per problem, the field path, exit code 2."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from kiln.cli import EXIT_INVALID, app

EXAMPLES = sorted(Path(__file__).parents[2].joinpath("examples").glob("*.yaml"))

VALID: dict[str, Any] = {
    "apiVersion": "kiln.dev/v1alpha1",
    "kind": "TrainingJob",
    "metadata": {"name": "digits"},
    "spec": {
        "task": "classification",
        "model": {"architecture": "resnet18"},
        "data": {"train": {"uri": "s3://bucket/train"}, "val": {"uri": "s3://bucket/val"}, "batchSize": 33},
    },
}


def run_validate(tmp_path: Path, text: str) -> tuple[int, str]:
    path = tmp_path / "job.yaml"
    path.write_text(text)
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.output


def mutated(path: str, value: Any) -> str:
    """VALID with the dotted `path` set to `value` (or removed when value is DELETE)."""
    document = copy.deepcopy(VALID)
    *parents, leaf = path.split(".")
    node = document
    for key in parents:
        node = node.setdefault(key, {})
    if value is DELETE:
        del node[leaf]
    else:
        node[leaf] = value
    return yaml.safe_dump(document)


class _Delete:
    """The mutation that removes a field; its repr names it, so test ids are the same in every process (xdist)."""

    def __repr__(self) -> str:
        return "<delete>"


DELETE = _Delete()
CE_AT_0 = {"epoch": 0, "weights": {"cross_entropy": 1.0}}  # a loss.schedule keyframe

# (mutation path, value, field path expected in the error, a word the reason must contain)
BAD_FIELDS = [
    ("spec.epochs", "ten", "spec.epochs", "integer"),
    ("spec.epochs", -1, "spec.epochs", "greater than or equal to 0"),
    ("spec.data.batchSize", -4, "spec.data.batchSize", "greater than or equal"),
    ("spec.optimizer", {"lr": -0.1}, "spec.optimizer.lr", "greater than 0"),
    ("spec.optimizer", {"lr": "fast"}, "spec.optimizer.lr", "number"),
    ("spec.task", "captioning", "spec.task", "classification"),
    ("spec.precision", "fp8", "spec.precision", "fp16"),
    ("spec.scheduler", {"name": "linear"}, "spec.scheduler.name", "cosine"),
    ("spec.optimzer", {"lr": 0.1}, "spec.optimzer", "unknown field"),
    ("spec.model.layers", 12, "spec.model.layers", "unknown field"),
    ("spec.data.train", {"format": "imagefolder"}, "spec.data.train.uri", "required"),
    ("spec.data", {"val": {"uri": "s3://x"}}, "spec.data.train", "required"),
    ("spec.model", {}, "spec.model.architecture", "required"),
    ("spec.data.valSplit", 0.2, "spec.data.valSplit", "exclusive"),
    ("spec.data.valSplit", 1.5, "spec.data.valSplit", "less than 1"),
    ("spec.augmentation", {"labelSmoothing": 1.0}, "spec.augmentation.labelSmoothing", "less than 1"),
    ("spec.augmentation", {"preset": "extreme"}, "spec.augmentation.preset", "heavy"),
    ("spec.model.pretrained", True, "spec.model.pretrained", "model hub"),
    ("spec.model.pretrained", "imagenet", "spec.model.pretrained", "s3://"),
    ("spec.resources", {"nodes": 0}, "spec.resources.nodes", "greater than or equal to 1"),
    ("spec.resources", {"gpusPerNode": 1.5}, "spec.resources.gpusPerNode", "integer"),
    ("spec.runPolicy", {"maxRestarts": -1}, "spec.runPolicy.maxRestarts", "greater than or equal to 0"),
    ("spec.runPolicy", {"retriableExitCodes": [300]}, "spec.runPolicy.retriableExitCodes[0]", "less than or equal"),
    ("spec.loss", {"name": "focal", "weights": {"dice": 1}}, "spec.loss.weights", "exclusive"),
    ("spec.gradAccumulation", 0, "spec.gradAccumulation", "greater than or equal to 1"),
    ("spec.data.train", {"uri": "s3://bucket/x", "format": "coco"}, "spec.data.train.format", "does not fit the task"),
    ("spec.validation", {"metric": "miou"}, "spec.validation.metric", "unknown classification metric"),
    ("spec.scheduler", {"warmupEpochs": 20}, "spec.scheduler.warmupEpochs", "less than epochs"),
    ("spec.checkpoint", {"everyEpochs": 0}, "spec.checkpoint.everyEpochs", "nothing would ever be saved"),
    ("spec.checkpoint", {"resume": "yesterday"}, "spec.checkpoint.resume", "auto, never"),
    ("spec.augmentation", {"transforms": [{"name": "NoSuchFlip"}]}, "spec.augmentation.transforms[0].name", "unknown"),
    ("spec.augmentation", {"transforms": [{"args": {}}]}, "spec.augmentation.transforms[0].name", "required"),
    ("spec.optimizer", {"name": "adamx"}, "spec.optimizer.name", "unknown optimizer 'adamx'; did you mean"),
    ("spec.model", {"architecture": "resnet1000"}, "spec.model.architecture", "unknown classification architecture"),
    ("spec.loss", {"name": "focal"}, "spec.loss.name", "unknown classification loss 'focal'"),
    # loss.schedule (issue 9): keyframes of the weights, replacing name and weights.
    ("spec.loss", {"name": "cross_entropy", "schedule": [CE_AT_0]}, "spec.loss.schedule", "replaces name and"),
    ("spec.loss", {"weights": {"cross_entropy": 1}, "schedule": [CE_AT_0]}, "spec.loss.schedule", "replaces name"),
    ("spec.loss", {"schedule": [CE_AT_0, CE_AT_0]}, "spec.loss.schedule", "epochs must strictly increase"),
    ("spec.loss", {"schedule": [{**CE_AT_0, "epoch": 5}, CE_AT_0]}, "spec.loss.schedule", "strictly increase"),
    (
        "spec.loss",
        {"schedule": [CE_AT_0, {"epoch": 3, "weights": {"cross_entropy": 1, "dice": 1}}]},
        "spec.loss.schedule",
        "must weigh the same losses",
    ),
    ("spec.loss", {"schedule": [CE_AT_0, {**CE_AT_0, "epoch": 10}]}, "spec.loss.schedule[1].epoch", "less than epochs"),
    (
        "spec.loss",
        {"schedule": [{"epoch": 0, "weights": {"dice": 1}}]},
        "spec.loss.schedule[0].weights.dice",
        "unknown",
    ),
    ("spec.loss", {"schedule": []}, "spec.loss.schedule", "at least 1 item"),
    ("spec.loss", {"schedule": [{"epoch": 0, "weights": {}}]}, "spec.loss.schedule[0].weights", "at least 1 item"),
    ("spec.loss", {"schedule": [{**CE_AT_0, "epoch": -1}]}, "spec.loss.schedule[0].epoch", "greater than or equal"),
    (
        "spec.augmentation",
        {"transforms": [{"name": "HorizontalFlip", "probability": 0.5}]},
        "spec.augmentation.transforms[0]",
        "unknown HorizontalFlip argument 'probability'",
    ),
    (
        "spec.augmentation",
        {"transforms": [{"name": "HorizontalFlip", "p": 0.5, "args": {"p": 1}}]},
        "spec.augmentation.transforms[0].args",
        "inline or under args, not both",
    ),
    # The API tells the truth (issue 8): schemes, URLs, mixup's pairing, hyperparameters an optimizer ignores.
    ("spec.data.train", {"uri": "ftp://host/x"}, "spec.data.train.uri", "other schemes are not supported"),
    ("spec.checkpoint", {"uri": "gs://bucket/ckpt"}, "spec.checkpoint.uri", "other schemes are not supported"),
    ("spec.output", {"uri": "http://host/out"}, "spec.output.uri", "other schemes are not supported"),
    ("spec.storage", {"endpointUrl": "not a url"}, "spec.storage.endpointUrl", "http:// or https:// URL"),
    ("spec.storage", {"endpointUrl": "minio:9000"}, "spec.storage.endpointUrl", "http:// or https:// URL"),
    ("spec.augmentation", {"mixup": 0.2}, "spec.data.batchSize", "must be even"),
    ("spec.optimizer", {"name": "sgd", "betas": [0.9, 0.99]}, "spec.optimizer.betas", "sgd takes no betas"),
    ("spec.optimizer", {"name": "adamw", "momentum": 0.5}, "spec.optimizer.momentum", "adamw takes no momentum"),
    ("spec.model", {"architecture": "resnet18", "encoder": "resnet34"}, "spec.model.encoder", "segmentation only"),
    ("spec.epochs", "10", "spec.epochs", "valid integer"),
    # epochs 0 evaluates checkpoint.resume (docs/design.md): it must name one, and data to evaluate on.
    ("spec.epochs", 0, "spec.checkpoint.resume", "checkpoint.resume must name it"),
    ("spec.channelsLast", "true", "spec.channelsLast", "valid boolean"),
    ("metadata.name", "Digits_Run", "metadata.name", "pattern"),
    ("metadata.name", "a" * 41, "metadata.name", "at most 40"),
    ("apiVersion", "kiln.dev/v1", "apiVersion", "expected kiln.dev/v1alpha1"),
    ("kind", "TrainJob", "kind", "expected TrainingJob or ExportJob"),
    ("spec", DELETE, "spec", "required"),
]


CASE_IDS = [f"{path}={value!r}"[:60] for path, value, _, _ in BAD_FIELDS]


@pytest.mark.parametrize(("path", "value", "field", "reason"), BAD_FIELDS, ids=CASE_IDS)
def test_bad_manifest_names_the_field(tmp_path: Path, path: str, value: Any, field: str, reason: str) -> None:
    code, output = run_validate(tmp_path, mutated(path, value))
    assert code == EXIT_INVALID
    lines = [line for line in output.splitlines() if line.strip()]
    matching = [line for line in lines if f": {field}: " in line]
    assert matching, f"no error names {field}:\n{output}"
    assert any(reason in line for line in matching), output
    assert all(line.startswith("error ") for line in lines), output
    assert "Traceback" not in output


def test_segmentation_rules(tmp_path: Path) -> None:
    document = copy.deepcopy(VALID)
    document["spec"]["task"] = "segmentation"
    document["spec"]["augmentation"] = {"mixup": 0.2}
    code, output = run_validate(tmp_path, yaml.safe_dump(document))
    assert code == EXIT_INVALID
    assert "spec.data.train.format: data.train.format does not fit the task" in output


def test_detection_is_accepted_and_its_typos_refused_before_the_pod(tmp_path: Path) -> None:
    document = copy.deepcopy(VALID)
    document["spec"]["task"] = "detection"
    document["spec"]["model"] = {"architecture": "fasterrcnn_resnet50_fpn_v2", "classNames": ["bolt", "nut"]}
    document["spec"]["data"] = {"train": {"uri": "s3://bucket/train", "format": "voc"}}
    assert run_validate(tmp_path, yaml.safe_dump(document))[0] == 0
    document["spec"]["model"]["architecture"] = "retinanet_resnet50"
    code, output = run_validate(tmp_path, yaml.safe_dump(document))
    assert code == EXIT_INVALID
    assert "spec.model.architecture: unknown detection architecture 'retinanet_resnet50'; did you mean" in output


def test_segmentation_is_accepted(tmp_path: Path) -> None:
    document = copy.deepcopy(VALID)
    document["spec"]["task"] = "segmentation"
    document["spec"]["model"] = {"architecture": "Unet", "encoder": "tu-resnet18", "numClasses": 4}
    document["spec"]["data"] = {"train": {"uri": "s3://bucket/train.csv", "format": "csv"}, "valSplit": 0.1}
    code, output = run_validate(tmp_path, yaml.safe_dump(document))
    assert code == 0, output


def test_loss_schedules_are_accepted_even_with_one_term(tmp_path: Path) -> None:
    one_term = {"schedule": [CE_AT_0, {"epoch": 9, "weights": {"cross_entropy": 0.5}}]}  # legal, if pointless
    code, output = run_validate(tmp_path, mutated("spec.loss", one_term))
    assert code == 0, output
    document = copy.deepcopy(VALID)
    document["spec"]["task"] = "segmentation"
    document["spec"]["model"] = {"architecture": "Unet", "encoder": "resnet34", "numClasses": 4}
    document["spec"]["data"] = {"train": {"uri": "s3://bucket/train.csv", "format": "csv"}, "valSplit": 0.1}
    document["spec"]["epochs"] = 30
    document["spec"]["loss"] = {
        "schedule": [
            {"epoch": 0, "weights": {"dice": 0.2, "cross_entropy": 0.8}},
            {"epoch": 20, "weights": {"dice": 0.8, "cross_entropy": 0.2}},
        ]
    }
    code, output = run_validate(tmp_path, yaml.safe_dump(document))
    assert code == 0, output


def test_inline_transform_arguments_are_valid(tmp_path: Path) -> None:
    document = copy.deepcopy(VALID)
    document["spec"]["augmentation"] = {"transforms": [{"name": "HorizontalFlip", "p": 0.5}]}
    code, output = run_validate(tmp_path, yaml.safe_dump(document))
    assert code == 0, output


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("spec: [unclosed", "invalid YAML at line 1"),
        ("kind: TrainingJob\n  bad: indent", "invalid YAML at line 2"),
        ("- just\n- a list", "expected a mapping"),
        ("", "no YAML documents"),
    ],
)
def test_unparseable_files(tmp_path: Path, text: str, reason: str) -> None:
    code, output = run_validate(tmp_path, text)
    assert code == EXIT_INVALID
    assert reason in output
    assert str(tmp_path / "job.yaml") in output


def test_missing_file_is_invalid_input(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["validate", str(tmp_path / "nope.yaml")])
    assert result.exit_code == EXIT_INVALID
    assert "nope.yaml: cannot read file" in result.output


def test_every_error_of_a_file_is_reported(tmp_path: Path) -> None:
    document = copy.deepcopy(VALID)
    document["spec"]["epochs"] = -1
    document["spec"]["optimizer"] = {"lr": 0}
    code, output = run_validate(tmp_path, yaml.safe_dump(document))
    assert code == EXIT_INVALID
    assert "spec.epochs" in output
    assert "spec.optimizer.lr" in output


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_examples_are_valid(example: Path) -> None:
    result = CliRunner().invoke(app, ["validate", str(example)])
    assert result.exit_code == 0, result.output


def test_multi_document_file_reports_document_index(tmp_path: Path) -> None:
    bad = copy.deepcopy(VALID)
    bad["spec"]["epochs"] = -1
    code, output = run_validate(tmp_path, yaml.safe_dump_all([VALID, bad]))
    assert code == EXIT_INVALID
    assert "job.yaml#1: spec.epochs" in output
    assert "job.yaml#0" not in output


@pytest.mark.parametrize(
    "uri", ["s3://bucket/train", "/data/train", "./train", "train", "file:///data/train", "./runs:v2/train"]
)
def test_uris_may_be_s3_or_paths(tmp_path: Path, uri: str) -> None:
    assert run_validate(tmp_path, mutated("spec.data.train", {"uri": uri}))[0] == 0


def test_mixup_with_an_even_batch_and_betas_for_adam_are_accepted(tmp_path: Path) -> None:
    document = copy.deepcopy(VALID)
    document["spec"]["data"]["batchSize"] = 32
    document["spec"]["augmentation"] = {"mixup": 0.2, "cutmix": 1.0}
    document["spec"]["optimizer"] = {"name": "lion", "betas": [0.95, 0.98]}
    code, output = run_validate(tmp_path, yaml.safe_dump(document))
    assert code == 0, output


def test_numbers_read_as_kubectl_reads_them(tmp_path: Path) -> None:
    """`lr: 1e-3` is a float to kubectl (Go YAML) and must be one here too, although PyYAML says string."""
    text = yaml.safe_dump(VALID) + "  optimizer: {lr: 1e-3, weightDecay: 5E-2}\n"
    assert "lr: 1e-3" in text
    code, output = run_validate(tmp_path, text)
    assert code == 0, output
