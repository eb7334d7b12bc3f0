"""What the exporter needs to know per task: the graph it exports, the output's name and meaning (for the
model card), how outputs become predictions, and the validation metric a quantized model is judged by.

Pre- and post-processing stay outside the graph for every task: the graph takes normalized NCHW float32 and
returns raw scores, and the model card states the normalization and how to read the scores. Detection has no
entry yet, so its checkpoints are refused (InvalidSource, exit 2, "the exporter does not handle it yet"). The
plan: export the whole torchvision detector in eval mode, its own normalization, box decoding and NMS inside
the graph (a client cannot rebuild those from a card), with boxes, scores and labels as outputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kiln.api.resolve import ResolvedTrainingJob
from kiln.trainer.metrics import pixel_confusion, segmentation_from_confusion
from kiln.trainer.registry import Registry


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
    metric: Callable[[torch.Tensor, torch.Tensor, ResolvedTrainingJob, int], float]
    """(outputs, targets, source job, number of classes) to the validation metric; larger is better."""
    top1: bool
    """Whether top-1 agreement with eager PyTorch is reported."""


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
