"""The exporter end to end, in-process: a Kiln checkpoint to ONNX and pt2 artifacts, verified in their own
runtimes, benchmarked, quantized, with model cards; and its failures, each with its reason and exit code."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from kiln.api.contract import ExitCode, ExportReport, parse_export_report
from kiln.api.resolve import ResolvedTrainingJob
from kiln.api.status import Reason
from kiln.trainer.export.main import main
from kiln.trainer.export.pipeline import run_export
from kiln.trainer.export.source import load_source
from tests.export.conftest import CLASSES
from tests.export.export_testkit import export_job, save_checkpoint, segmentation_job, write_export_spec
from tests.trainer.trainer_testkit import write_images

pytestmark = pytest.mark.slow


def run(tmp_path: Path, checkpoint: str, **spec: Any) -> tuple[ExportReport, Path]:
    output = tmp_path / "out"
    work = tmp_path / "work"
    work.mkdir()
    return run_export(export_job(checkpoint, output, **spec), work), output


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, classifier: tuple[ResolvedTrainingJob, str]
             ) -> tuple[ExportReport, Path]:  # fmt: skip
    """One export of the classifier to every format, with dynamic int8 quantization, shared by the tests below."""
    _, checkpoint = classifier
    root = tmp_path_factory.mktemp("exported")
    job = export_job(checkpoint, root / "out", formats=["onnx", "pt2", "torchscript"], quantize={"mode": "dynamic"})
    with pytest.MonkeyPatch.context() as patch:  # through the pod's entry point, as the operator runs it
        patch.setenv("KILN_TERMINATION_LOG", str(root / "termination-log"))
        assert main(["--spec", str(write_export_spec(job, root / "exportjob.json"))]) == ExitCode.OK
    compact = parse_export_report((root / "termination-log").read_text())
    report = parse_export_report((root / "out" / "export-report.json").read_text())
    assert compact is not None and report is not None and compact.report_uri == report.report_uri
    return report, root / "out"


def artifact(report: ExportReport, fmt: str, quantization: str = "none") -> Any:
    return next(a for a in report.artifacts if a.format == fmt and a.quantization == quantization)


def test_every_format_is_written_verified_and_benchmarked(exported: tuple[ExportReport, Path]) -> None:
    report, output = exported
    assert (report.state, report.condition_reason, report.exit_code) == ("completed", Reason.EXPORTED, ExitCode.OK)
    assert report.exported_weights == "ema" and report.verification_inputs == "validation"
    assert set(report.reference_latency_ms) == {"1", "4"}
    for fmt in ("onnx", "pt2", "torchscript"):
        entry = artifact(report, fmt)
        path = Path(entry.uri)
        assert path.parent == output and path.stat().st_size == entry.size_bytes > 0
        assert entry.verified is True and entry.recommended is True and entry.top1_agreement == 1.0
        assert entry.max_abs_diff is not None and entry.max_abs_diff <= 1e-4
        assert set(entry.latency_ms) == set(entry.speedup) == set(entry.throughput) == {"1", "4"}
        assert all(0 < t.p50 <= t.p95 for t in entry.latency_ms.values())
    assert artifact(report, "onnx").exporter == "dynamo" and artifact(report, "onnx").fallback_reason is None
    assert report.report_uri == str(output / "export-report.json")


def test_the_ema_weights_are_exported_and_the_batch_dimension_is_dynamic(
    exported: tuple[ExportReport, Path], classifier: tuple[ResolvedTrainingJob, str]
) -> None:
    report, _ = exported
    source = load_source(classifier[1], None)
    images = torch.randn(5, 3, 16, 16)  # neither the example batch (2) nor verification's (3)
    with torch.no_grad():
        expected = source.network(images).numpy()
    session = ort.InferenceSession(artifact(report, "onnx").uri, providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == ["batch", 3, 16, 16]
    np.testing.assert_allclose(session.run(None, {"image": images.numpy()})[0], expected, atol=1e-5)
    program = torch.export.load(artifact(report, "pt2").uri).module()
    np.testing.assert_allclose(program(images).detach().numpy(), expected, atol=1e-5)
    # The model's own weights (not the EMA copy, which the testkit scales) would give other outputs.
    state = torch.load(source.uri, weights_only=False)
    source.network.load_state_dict(state["model"])
    with torch.no_grad():
        assert not np.allclose(source.network(images).numpy(), expected, atol=1e-5)


def test_every_artifact_carries_a_model_card(exported: tuple[ExportReport, Path],
                                             classifier: tuple[ResolvedTrainingJob, str]) -> None:  # fmt: skip
    report, _ = exported
    job, checkpoint = classifier
    for entry in report.artifacts:
        card = json.loads(Path(entry.model_card_uri).read_text())
        assert card["task"] == "classification" and card["classNames"] == list(CLASSES)
        assert card["input"]["layout"] == "NCHW" and card["input"]["shape"] == ["batch", 3, 16, 16]
        assert card["normalization"] == {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}  # DebugCNN's own
        assert card["source"]["checkpoint"] == checkpoint and card["source"]["sha256"] == report.source_sha256
        assert card["source"]["weights"] == "ema" and card["trainingJob"]["name"] == job.name
        assert card["trainingJob"]["metrics"]["val/accuracy"] == 0.75 and card["kilnVersion"]
        assert card["quantization"] == entry.quantization
    model = onnx.load(artifact(report, "onnx").uri)
    props = {prop.key: prop.value for prop in model.metadata_props}
    assert json.loads(props["kiln.class_names"]) == list(CLASSES)
    assert props["kiln.source_sha256"] == report.source_sha256 and props["kiln.task"] == "classification"
    assert json.loads(props["kiln.mean"]) == [0.5, 0.5, 0.5] and props["kiln.input_layout"] == "NCHW"
    assert json.loads(props["kiln.model_card"])["trainingJob"]["name"] == job.name


def test_dynamic_quantization_reports_its_metric_and_speed_against_fp32(exported: tuple[ExportReport, Path]) -> None:
    report, output = exported
    fp32, int8 = artifact(report, "onnx"), artifact(report, "onnx", "dynamic")
    assert Path(int8.uri) == output / "model.int8-dynamic.onnx" and int8.size_bytes < fp32.size_bytes
    assert int8.verified is None and int8.metric_delta is not None and abs(int8.metric_delta) <= 1
    assert set(int8.fp32_speedup) == {"1", "4"}
    slower = int8.fp32_speedup["4"] < 1.0
    dropped = int8.metric_delta < -0.01
    assert int8.recommended is (not slower and not dropped)
    if not int8.recommended:
        assert int8.not_recommended_reason and ("quantize.minSpeedup" in int8.not_recommended_reason
                                                or "quantize.maxMetricDrop" in int8.not_recommended_reason)  # fmt: skip


def test_a_tolerance_no_runtime_can_meet_fails_verification_with_the_numbers(tmp_path: Path) -> None:
    # A unet sums over enough terms that onnxruntime's and PyTorch's orders of summation never agree to 1e-12.
    job = segmentation_job(tmp_path, _shapes(tmp_path))
    checkpoint = save_checkpoint(job, ("background", "circle", "square", "triangle"), ema=False)
    report, output = run(tmp_path, checkpoint, verify={"tolerance": 1e-12, "samples": 4},
                         onnx={"dynamicSpatial": True}, benchmark={"batchSizes": []})  # fmt: skip
    assert (report.state, report.condition_reason, report.exit_code) == (
        "failed", Reason.VERIFICATION_FAILED, ExitCode.VERIFICATION_FAILED)  # fmt: skip
    onnx_artifact = artifact(report, "onnx")
    assert onnx_artifact.verified is False and onnx_artifact.recommended is False
    assert f"max abs diff {onnx_artifact.max_abs_diff:.3g} > verify.tolerance 1e-12" in (report.reason or "")
    assert (output / "model.onnx").exists()  # still written, for whoever investigates
    # The segmentation graph takes any batch and any spatial size its stride allows, and returns masks.
    session = ort.InferenceSession(str(output / "model.onnx"), providers=["CPUExecutionProvider"])
    masks = session.run(None, {"image": np.random.default_rng(0).standard_normal((3, 3, 64, 96), np.float32)})[0]
    assert session.get_outputs()[0].name == "masks" and masks.shape == (3, 4, 64, 96)
    card = json.loads((output / "model.onnx.card.json").read_text())
    assert card["task"] == "segmentation" and card["input"]["shape"] == ["batch", 3, "height", "width"]
    assert report.exported_weights == "model" and report.verification_inputs == "validation"


def _shapes(tmp_path: Path) -> Path:
    from kiln.trainer.shapes import write_shapes

    return write_shapes(tmp_path / "shapes", splits={"train": 4, "val": 4}, size=32)


def test_without_reachable_validation_data_verification_uses_random_inputs(
    tmp_path: Path, classifier: tuple[ResolvedTrainingJob, str], images: Path
) -> None:
    data = tmp_path / "moved"
    write_images(data / "train", 2, seed=1)
    write_images(data / "val", 2, seed=2)
    update = {"spec": _with_data(classifier[0], data), "checkpoint_uri": str(tmp_path / "checkpoints")}
    job = classifier[0].model_copy(update=update)  # its own checkpoints: the shared classifier's stay as they are
    checkpoint = save_checkpoint(job, CLASSES)
    (data / "val").rename(tmp_path / "gone")  # the source job's data is not reachable from the exporter
    report, _ = run(tmp_path, checkpoint, formats=["pt2"], benchmark={"batchSizes": []})
    assert report.state == "completed" and report.verification_inputs == "random"
    assert artifact(report, "pt2").verified is True


def _with_data(job: ResolvedTrainingJob, root: Path) -> Any:
    data = job.spec.data
    update = {"train": data.train.model_copy(update={"uri": str(root / "train")}),  # type: ignore[union-attr]
              "val": data.val.model_copy(update={"uri": str(root / "val")})}  # type: ignore[union-attr]  # fmt: skip
    return job.spec.model_copy(update={"data": data.model_copy(update=update)})


def test_the_legacy_exporter_takes_over_when_the_dynamo_one_fails_and_says_why(
    tmp_path: Path, classifier: tuple[ResolvedTrainingJob, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*_args: Any, **_kwargs: Any) -> Any:
        raise RuntimeError("data-dependent control flow")

    monkeypatch.setattr(torch.export, "export", refuse)
    report, _ = run(tmp_path, classifier[1], benchmark={"batchSizes": []})
    onnx_artifact = artifact(report, "onnx")
    assert report.state == "completed" and onnx_artifact.exporter == "legacy" and onnx_artifact.verified is True
    assert onnx_artifact.fallback_reason == "RuntimeError: data-dependent control flow"


@pytest.mark.parametrize(
    ("source", "reason", "code", "says"),
    [
        ("missing", Reason.SOURCE_NOT_FOUND, ExitCode.INVALID, "does not exist"),
        ("not-a-checkpoint", Reason.INVALID_SOURCE, ExitCode.INVALID, "is not a loadable checkpoint"),
        ("other-task", Reason.INVALID_SOURCE, ExitCode.INVALID, "cannot rebuild"),
        ("unreachable", Reason.SOURCE_UNREADABLE, ExitCode.FAILED, "cannot reach endpoint http://127.0.0.1:9"),
    ],
)
def test_bad_sources_end_with_one_line_and_the_right_exit_code(
    tmp_path: Path, classifier: tuple[ResolvedTrainingJob, str], monkeypatch: pytest.MonkeyPatch,
    source: str, reason: Reason, code: ExitCode, says: str,
) -> None:  # fmt: skip
    checkpoint = tmp_path / "state.pt"
    if source == "not-a-checkpoint":
        checkpoint.write_bytes(b"not a pickle")
    elif source == "other-task":
        state = torch.load(classifier[1], weights_only=False)
        spec = state["spec"]["spec"]  # a detection job's spec over a classifier's weights
        spec["task"], spec["data"]["train"]["format"], spec["data"]["val"]["format"] = "detection", "coco", "coco"
        torch.save(state, checkpoint)
    storage: dict[str, Any] = {}
    if source == "unreachable":  # an S3 endpoint that refuses connections: possibly transient, so exit 1
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
        checkpoint, storage = "s3://bucket/runs/clf/state.pt", {"storage": {"endpointUrl": "http://127.0.0.1:9"}}
    log = tmp_path / "termination-log"
    monkeypatch.setenv("KILN_TERMINATION_LOG", str(log))
    spec = write_export_spec(export_job(str(checkpoint), tmp_path / "out", **storage), tmp_path / "exportjob.json")
    assert main(["--spec", str(spec)]) == code
    report = parse_export_report(log.read_text())
    assert report is not None and report.condition_reason == reason and says in (report.reason or "")
    assert "\n" not in (report.reason or "")
    if source != "unreachable":  # the output is a local folder: the full report is there too
        assert parse_export_report((tmp_path / "out" / "export-report.json").read_text()) is not None
