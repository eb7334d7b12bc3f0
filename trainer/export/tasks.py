"""What the exporter needs to know per task: the graph it exports, the output's name and meaning (for the
model card), how outputs become predictions, and the validation metric a quantized model is judged by.

Classification and segmentation keep pre- and post-processing outside the graph: the graph takes normalized
NCHW float32 and returns raw scores, and the model card states the normalization and how to read the scores.

Detection puts both inside: the whole torchvision detector is exported in eval mode, its own transform
(normalization, resize), box decoding, score threshold and NMS included, since a client cannot rebuild those
from a card. The graph takes ONE image per call ([1, 3, H, W], RGB, 0..1, not normalized) and returns
``detections`` [N, 6]: x1, y1, x2, y2 in input pixels, score, and Kiln's 0-based class id (as float32; the
background label is dropped and the rest shifted down, as the trainer does), sorted by score. One table rather
than three outputs keeps every format and runtime on the one-output contract the pipeline verifies. One image
per call because torchvision's detectors take a list of images and their ONNX export freezes it at one; pt2 is
refused (torch.export cannot trace the data-dependent number of detections) and so is int8 quantization (no
detection metric for the quantized model to be judged by), both before any export starts.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from kiln.api.resolve import ResolvedTrainingJob
from kiln.trainer.augment import detection_eval_pipeline, eval_pipeline
from kiln.trainer.metrics import pixel_confusion, segmentation_from_confusion
from kiln.trainer.registry import Registry
from kiln.trainer.tasks.detection_model import from_detections

Metric = Callable[[torch.Tensor, torch.Tensor, ResolvedTrainingJob, int], float]
PREPROCESSING = (
    "resize to height x width, scale pixels to 0..1 (divide by 255), subtract mean, divide by std, per channel"
)


@dataclass(frozen=True)
class ExportTaskInfo:
    name: str
    output_name: str
    """The graph output's name (and the ONNX output name)."""
    output_meaning: str
    """How a client reads the output, for the model card."""
    graph: Callable[[nn.Module], nn.Module]
    """The module that is exported: the network with training-only outputs dropped."""
    predict: Callable[[torch.Tensor], torch.Tensor]
    """Outputs to predicted labels (per image, or per pixel)."""
    metric_name: str
    metric: Metric | None
    """(outputs, targets, source job, number of classes) to the validation metric; larger is better. None: the
    task's exports are not quantized."""
    top1: bool
    """Whether top-1 agreement with eager PyTorch is reported."""
    batched: bool = True
    """Whether the graph takes a batch of images; False: one image per call (onnx.dynamicBatch is ignored)."""
    refused_formats: Mapping[str, str] = field(default_factory=dict)
    """Formats that cannot export this task's graph, with the reason (refused before any export starts)."""
    preprocessing: str = PREPROCESSING
    """What a client does to an image before the graph, for the model card."""
    input_pipeline: Callable[[int, tuple[float, ...], tuple[float, ...]], Any] = eval_pipeline
    """(image size, mean, std) to the pipeline validation images are prepared with for the graph."""
    canonical: Callable[[torch.Tensor, tuple[int, int, int]], torch.Tensor] | None = None
    """One call's outputs (and the input shape) to the form verification compares; None: as they are."""


EXPORT_TASKS: Registry[ExportTaskInfo] = Registry("exportable task")


class MasksOnly(nn.Module):
    """smp networks with model.args.aux_params return (masks, presence logits); the presence head only exists
    to be trained, so the exported graph returns the masks alone."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        out: Any = self.network(image)
        return out[0] if isinstance(out, tuple) else out


def _top1(outputs: torch.Tensor) -> torch.Tensor:
    return outputs.argmax(dim=1)


def _accuracy(outputs: torch.Tensor, targets: torch.Tensor, _job: ResolvedTrainingJob, _classes: int) -> float:
    return float((_top1(outputs) == targets).double().mean())


def _mask_labels(outputs: torch.Tensor) -> torch.Tensor:
    # One channel is binary segmentation (a sigmoid): foreground where the logit is positive.
    return (outputs[:, 0] > 0).long() if outputs.shape[1] == 1 else outputs.argmax(dim=1)


def _miou(outputs: torch.Tensor, targets: torch.Tensor, job: ResolvedTrainingJob, classes: int) -> float:
    labels = max(classes, 2)
    ignore = job.spec.data.ignore_index if job.spec.data.ignore_index is not None else labels
    confusion = pixel_confusion(_mask_labels(outputs), targets, labels, ignore)
    return segmentation_from_confusion(confusion)["miou"]


EXPORT_TASKS.register(
    ExportTaskInfo(
        name="classification",
        output_name="logits",
        output_meaning="[batch, classes] raw logits: softmax over dim 1 gives class probabilities, in classNames order",
        graph=lambda network: network,
        predict=_top1,
        metric_name="accuracy",
        metric=_accuracy,
        top1=True,
    )
)
EXPORT_TASKS.register(
    ExportTaskInfo(
        name="segmentation",
        output_name="masks",
        output_meaning=(
            "[batch, classes, height, width] raw per-pixel logits: argmax over dim 1 gives class indices; with one "
            "channel (binary), a pixel is foreground where its logit is above 0"
        ),
        graph=MasksOnly,
        predict=_mask_labels,
        metric_name="miou",
        metric=_miou,
        top1=False,
    )
)


class DetectionGraph(nn.Module):
    """One image (a [1, 3, H, W] batch at 0..1) to its detections as one [N, 6] table: box (x1, y1, x2, y2, input
    pixels), score, 0-based class id. The detector normalizes, resizes, decodes and suppresses inside."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        found = from_detections(self.network(list(image.unbind(0))))[0]
        return torch.cat([found["boxes"], found["scores"][:, None], found["labels"][:, None].float()], dim=1)


def _detections_in_order(outputs: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """Verification's rule for detections: the same count (else a shape mismatch, which fails), rows sorted by
    score (ties in score may come out of NMS in either order), boxes divided by the input's width and height so
    verify.tolerance reads as a share of the image, as it does for scores."""
    _, height, width = shape
    rows = outputs[torch.argsort(outputs[:, 4], descending=True, stable=True)]
    scale = torch.tensor([width, height, width, height, 1.0, 1.0], dtype=rows.dtype)
    return rows / scale


def _detection_pipeline(size: int, _mean: tuple[float, ...], _std: tuple[float, ...]) -> Any:
    return detection_eval_pipeline(size)  # the graph normalizes itself


EXPORT_TASKS.register(
    ExportTaskInfo(
        name="detection",
        output_name="detections",
        output_meaning=(
            "[detections, 6] for the one input image, sorted by score: x1, y1, x2, y2 (input pixels), score, "
            "class index into classNames (0-based, as float); score threshold and NMS already applied"
        ),
        graph=DetectionGraph,
        predict=lambda outputs: outputs[:, 5],
        metric_name="map",
        metric=None,
        top1=False,
        batched=False,
        refused_formats={
            "pt2": "torch.export cannot trace a torchvision detector (its number of detections depends on the data)"
        },
        preprocessing=(
            "one image per call, shape [1, 3, height, width]: scale pixels to 0..1 (divide by 255); the graph "
            "normalizes (mean and std below) and resizes itself; boxes come back in the input's pixels"
        ),
        input_pipeline=_detection_pipeline,
        canonical=_detections_in_order,
    )
)
