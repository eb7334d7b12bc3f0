"""Detection checkpoints through the exporter: the whole torchvision detector (its normalization, resize, box
decoding and NMS) in one ONNX graph, one image per call, verified in onnxruntime against eager PyTorch on the
source job's validation images; its outputs read without Kiln; the formats and modes it cannot have refused
before anything is exported."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from kiln.api.contract import ExitCode, ExportReport
from kiln.api.resolve import ResolvedTrainingJob
from kiln.api.status import Reason
from kiln.trainer.detection_shapes import CLASSES, write_detection_shapes
from kiln.trainer.export.failures import InvalidSpec
from kiln.trainer.export.pipeline import run_export
from kiln.trainer.export.source import load_source
from tests.export.export_testkit import export_job, save_checkpoint
from tests.trainer.trainer_testkit import make_job

pytestmark = pytest.mark.slow

SIZE = 64
# The smallest listed detector at 64 px; a score threshold of 0 so even random weights detect something, and
# verification compares real boxes rather than two empty tables.
DETECTOR = {"architecture": "fasterrcnn_mobilenet_v3_large_320_fpn", "args": {"box_score_thresh": 0.0}}


@pytest.fixture(scope="module")
def detector(tmp_path_factory: pytest.TempPathFactory) -> tuple[ResolvedTrainingJob, str]:
    root = tmp_path_factory.mktemp("detector")
    shapes = write_detection_shapes(root / "data", splits={"train": 4, "val": 4}, size=SIZE, formats=("coco",))
    splits = {split: {"uri": str(shapes / "coco" / split), "format": "coco"} for split in ("train", "val")}
    job = make_job(root, shapes, name="det", task="detection", model=DETECTOR, data={**splits, "imageSize": SIZE})
    return job, save_checkpoint(job, CLASSES, ema=False)


def run(tmp_path: Path, checkpoint: str, **spec: Any) -> tuple[ExportReport, Path]:
    output, work = tmp_path / "out", tmp_path / "work"
    work.mkdir()
    return run_export(export_job(checkpoint, output, **spec), work), output


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, detector: tuple[ResolvedTrainingJob, str]
             ) -> tuple[ExportReport, Path]:  # fmt: skip
    return run(tmp_path_factory.mktemp("exported"), detector[1], formats=["onnx", "torchscript"], verify={"samples": 4})


def test_the_detector_exports_verified_one_image_a_call(exported: tuple[ExportReport, Path]) -> None:
    report, output = exported
    assert (report.state, report.condition_reason, report.exit_code) == ("completed", Reason.EXPORTED, ExitCode.OK)
    assert report.verification_inputs == "validation"
    onnx_artifact, torchscript = report.artifacts
    assert (onnx_artifact.format, torchscript.format) == ("onnx", "torchscript")
    assert all(a.verified is True and a.max_abs_diff is not None for a in report.artifacts)
    # torch.export cannot trace a detector, so the legacy exporter made it, and the report says why.
    assert onnx_artifact.exporter == "legacy" and onnx_artifact.fallback_reason
    assert set(report.reference_latency_ms) == set(onnx_artifact.latency_ms) == {"1"}  # batchSizes [1, 4]
    card = json.loads((output / "model.onnx.card.json").read_text())
    assert card["task"] == "detection" and card["classNames"] == list(CLASSES)
    assert card["input"]["shape"] == [1, 3, SIZE, SIZE] and "normalizes" in card["input"]["preprocessing"]
    assert card["output"]["name"] == "detections"
    metadata = {p.key: p.value for p in onnx.load(str(output / "model.onnx")).metadata_props}
    assert metadata["kiln.task"] == "detection" and json.loads(metadata["kiln.class_names"]) == list(CLASSES)


def test_the_onnx_detections_are_usable_without_kiln(
    exported: tuple[ExportReport, Path], detector: tuple[ResolvedTrainingJob, str]
) -> None:
    """A client feeds a 0..1 image and reads boxes in its pixels, scores, and 0-based class ids: torchvision's
    own labels (background at 0) shifted down by one."""
    _, output = exported
    session = ort.InferenceSession(str(output / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["detections"]
    image = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    (table,) = session.run(None, {"image": image.numpy()})
    network = load_source(detector[1], None).network
    with torch.no_grad():
        (own,) = network([image[0]])
    foreground = own["labels"] > 0
    assert table.shape == (int(foreground.sum()), 6) and len(table) > 0
    np.testing.assert_allclose(table[:, :4], own["boxes"][foreground].numpy(), atol=1e-3)
    np.testing.assert_allclose(table[:, 4], own["scores"][foreground].numpy(), atol=1e-4)
    np.testing.assert_array_equal(table[:, 5], (own["labels"][foreground] - 1).numpy())
    assert set(np.unique(table[:, 5])) <= set(range(len(CLASSES)))
    assert (table[:, :4] >= 0).all() and (table[:, :4] <= SIZE).all()


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"formats": ["onnx", "pt2"]}, "formats: pt2 cannot hold a detection model: torch.export cannot trace"),
        ({"quantize": {"mode": "dynamic"}}, "quantize.mode dynamic: detection models are not quantized"),
    ],
)
def test_what_a_detector_cannot_be_is_refused_before_exporting(
    tmp_path: Path, detector: tuple[ResolvedTrainingJob, str], spec: dict[str, Any], message: str
) -> None:
    with pytest.raises(InvalidSpec, match=message):
        run(tmp_path, detector[1], **spec)
    assert not any((tmp_path / "work").iterdir())  # refused before the first export
    assert InvalidSpec.exit_code == ExitCode.INVALID
