"""The segmentation network: an smp architecture and encoder with model.args, weights from model.pretrained, the
optional auxiliary classification head (model.args.aux_params) with the presence loss that trains it, and the
encoder as the part transfer learning freezes or trains at a scaled learning rate.

smp's auxiliary head predicts image-level labels, which segmentation data does not have; what a mask does say is
which classes an image contains, so that is what the head learns. Without a loss it would get no gradient, which
DDP refuses (a parameter that never joins the backward), so aux_params and the presence loss come together.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import segmentation_models_pytorch as smp
import timm
import torch
import torch.nn.functional as F
from torch import nn

from kiln.api.catalogue import TIMM_ENCODER_PREFIX, unknown_name_message
from kiln.api.model import KILN_MODEL_ARGS, SEGMENTATION_LOGITS_ONLY
from kiln.api.resolve import ResolvedTrainingJob
from kiln.trainer.errors import InvalidInput
from kiln.trainer.models import build_model, construct, load_matching, matching_tensors, model_args, read_weights
from kiln.trainer.tasks.base import Batch, TaskData
from kiln.trainer.transfer import PretrainedPart, Transfer

# Where the objective leaves the auxiliary head's output in the batch, for the presence loss.
PRESENCE_LOGITS = "presence_logits"
PRESENCE = "presence"  # the loss that trains the auxiliary head


def _check_encoder(name: str) -> None:
    if name.startswith(TIMM_ENCODER_PREFIX):
        if not timm.is_model(name.removeprefix(TIMM_ENCODER_PREFIX)):
            raise InvalidInput(unknown_name_message("model.encoder timm model (tu-<name>)", name, []))
        return
    encoders = smp.encoders.get_encoder_names()
    if name not in encoders:
        raise InvalidInput(unknown_name_message("model.encoder (an smp encoder, or tu-<timm model>)", name, encoders))


def _smp_args(job: ResolvedTrainingJob, architecture: str, num_classes: int) -> dict[str, Any]:
    """model.args for ``smp.create_model``. smp hands what the architecture does not take to the encoder, and
    only a tu- encoder (a timm model) uses it: for any other encoder an unknown argument would vanish."""
    args, encoder = model_args(job.spec.model), job.spec.model.encoder or ""
    takes = set(inspect.signature(smp.MODEL_ARCHITECTURES_MAPPING[architecture]).parameters) - {"kwargs"}
    unknown = sorted(args.keys() - takes)
    if unknown and not encoder.startswith(TIMM_ENCODER_PREFIX):
        reason = unknown_name_message(f"{architecture} argument", unknown[0], takes - KILN_MODEL_ARGS.keys())
        raise InvalidInput(f"model.args.{unknown[0]}: {reason} (only tu- encoders take more)")
    aux = args.get("aux_params")
    if aux is not None and not isinstance(aux, dict):
        raise InvalidInput("model.args.aux_params: must be an object of smp classification-head arguments")
    for key, reason in SEGMENTATION_LOGITS_ONLY.items():
        for path, given in (("model.args", args), ("model.args.aux_params", aux or {})):
            if key in given:
                raise InvalidInput(f"{path}.{key}: {reason}")
    if aux is not None:
        if "classes" in aux:
            raise InvalidInput("model.args.aux_params.classes: set by model.numClasses; Kiln passes it itself")
        if PRESENCE not in job.loss_weights:
            raise InvalidInput(
                "model.args.aux_params: the classification head learns from the presence loss: add presence to "
                "loss.weights, for example {dice: 0.5, cross_entropy: 0.5, presence: 0.2}"
            )
        args["aux_params"] = {**aux, "classes": num_classes}
    return args


def build_segmentation_model(job: ResolvedTrainingJob, num_classes: int) -> nn.Module:
    spec, image_size = job.spec.model, job.spec.data.image_size
    if spec.source:  # a plugin builds the whole network
        return build_model(spec, num_classes, job.spec.storage)
    architecture = spec.architecture.lower()
    if architecture not in smp.MODEL_ARCHITECTURES_MAPPING:
        valid = smp.MODEL_ARCHITECTURES_MAPPING
        raise InvalidInput(unknown_name_message("model.architecture (an smp architecture)", spec.architecture, valid))
    encoder = spec.encoder or ""
    _check_encoder(encoder)
    args = _smp_args(job, architecture, num_classes)
    try:
        # encoder_weights=None always: there is no model hub at run time; weights come from model.pretrained.
        what = f"{architecture} with encoder {encoder}"
        model = construct(
            smp.create_model, what, args, arch=architecture, encoder_name=encoder, encoder_weights=None,
            classes=num_classes,
        )  # fmt: skip
    except (ValueError, KeyError, TypeError, AssertionError, RuntimeError) as exc:
        given = f" and model.args {sorted(args)}" if args else ""
        raise InvalidInput(f"model: smp cannot build {architecture} with encoder {encoder}{given}: {exc}") from exc
    stride = getattr(getattr(model, "encoder", None), "output_stride", 1)
    if getattr(model, "requires_divisible_input_shape", False) and image_size % stride:
        needs = f"{architecture} with {encoder} needs a multiple of {stride}"
        raise InvalidInput(f"data.imageSize: {needs}, not {image_size}")
    if spec.pretrained:
        load_segmentation_weights(model, spec.pretrained, job)
    return model


def load_segmentation_weights(model: nn.Module, uri: str, job: ResolvedTrainingJob) -> None:
    """A whole network (a Kiln checkpoint of the same architecture) or the encoder alone (a backbone's state
    dict: an smp encoder's, or a timm model's for tu- encoders): whichever part matches more tensors."""
    weights = read_weights(uri, job.spec.storage)
    encoder = getattr(model, "encoder", None)
    candidates = [model, encoder, getattr(encoder, "model", None)]  # tu- encoders keep the timm model in .model
    parts = [part for part in candidates if isinstance(part, nn.Module)]
    best = max(parts, key=lambda part: len(matching_tensors(part, weights)))
    if not matching_tensors(best, weights):
        raise InvalidInput(f"model.pretrained: no tensor in {uri} matches the network or its encoder")
    load_matching(best, weights, uri)


def encoder_transfer(job: ResolvedTrainingJob) -> Transfer | None:
    """model.freezeEncoder and model.encoderLrScale act on everything under the network's ``encoder``."""
    spec = job.spec.model
    if spec.freeze_encoder is None and spec.encoder_lr_scale is None:
        return None
    return Transfer(
        PretrainedPart("encoder", include=("encoder",)),
        "model.freezeEncoder" if spec.freeze_encoder is not None else "model.encoderLrScale",
        freeze_epochs=spec.freeze_encoder.epochs if spec.freeze_encoder is not None else 0,
        lr_scale=spec.encoder_lr_scale,
    )


def masks_of(outputs: Any, batch: Batch) -> torch.Tensor:
    """The mask logits of a forward pass. With aux_params smp returns (masks, labels); the labels go into the
    batch for the presence loss, so losses, metrics and predictions all see the masks alone."""
    if isinstance(outputs, tuple):
        masks, batch[PRESENCE_LOGITS] = outputs
        return masks
    return outputs


def presence_targets(mask: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(images, classes) of 0 and 1: whether each class has a pixel in each mask. Ignored pixels hold a value of
    at least the label count, so they count for no class. Binary segmentation predicts the foreground alone."""
    labels = max(num_classes, 2)
    present = torch.zeros(mask.shape[0], labels + 1, dtype=torch.bool, device=mask.device)
    present.scatter_(1, mask.flatten(1).clamp(max=labels), True)
    return present[:, 1:2] if num_classes == 1 else present[:, :labels]


def presence_loss(job: ResolvedTrainingJob, data: TaskData) -> Callable[[Any, Batch], torch.Tensor]:
    if "aux_params" not in job.spec.model.args:
        raise InvalidInput("loss: presence trains smp's classification head: set model.args.aux_params")

    def loss(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        target = presence_targets(batch["mask"], data.num_classes).float()
        return F.binary_cross_entropy_with_logits(batch[PRESENCE_LOGITS].float(), target)

    return loss
