"""The segmentation network: model.args into smp, the auxiliary classification head (aux_params) and the presence
loss that trains it, and the refusals that name model.args.<key>."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from inprocess import CPU
from trainer_testkit import make_job, merge

from kiln.api.resolve import ResolvedTrainingJob
from kiln.trainer.distributed import unwrap
from kiln.trainer.errors import InvalidInput
from kiln.trainer.shapes import write_shapes
from kiln.trainer.tasks.base import TaskData
from kiln.trainer.tasks.segmentation import LOSSES
from kiln.trainer.tasks.segmentation_model import build_segmentation_model, presence_targets
from kiln.trainer.trainer import Trainer

pytestmark = pytest.mark.timeout(120)

FOLDER = {"format": "segmentation-folder"}
UNET = {"architecture": "unet", "encoder": "resnet18", "numClasses": 4}
PRESENCE = {"weights": {"dice": 0.5, "cross_entropy": 0.5, "presence": 0.2}}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_shapes(tmp_path_factory.mktemp("shapes"), splits={"train": 8, "val": 4}, size=32)


def seg_job(tmp_path: Path, dataset: Path, /, **overrides: Any) -> ResolvedTrainingJob:
    base = {"task": "segmentation", "model": UNET, "data": {"train": FOLDER, "val": FOLDER, "imageSize": 32}}
    return make_job(tmp_path, dataset, **merge(base, overrides))


def test_args_reach_the_smp_architecture_and_a_timm_encoder(tmp_path: Path, shapes: Path) -> None:
    args = {"decoder_channels": [64, 32, 32, 16, 20], "decoder_attention_type": "scse"}
    model = build_segmentation_model(seg_job(tmp_path, shapes, model={"args": args}), 4)
    assert model.segmentation_head[0].in_channels == 20  # type: ignore[index]
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 4, 32, 32)
    timm_encoder = {"encoder": "tu-resnet18", "args": {"drop_path_rate": 0.2}}
    model = build_segmentation_model(seg_job(tmp_path, shapes, model=timm_encoder), 4)
    rates = [m.drop_prob for m in model.encoder.modules() if hasattr(m, "drop_prob")]  # type: ignore[union-attr]
    assert rates and max(rates) > 0


@pytest.mark.parametrize(
    ("model", "loss", "reason"),
    [
        ({"args": {"decoder_chanels": [8] * 5}}, None, "model.args.decoder_chanels: unknown unet argument"),
        ({"args": {"classes": 3}}, None, "model.args.classes: set by model.numClasses"),
        ({"args": {"encoder_weights": "imagenet"}}, None, "model.args.encoder_weights: set by model.pretrained"),
        ({"args": {"activation": "sigmoid"}}, None, "model.args.activation: Kiln's losses and metrics take logits"),
        (
            {"encoder": "tu-resnet18", "args": {"dropout": 0.1}},
            None,
            "model.args.dropout: unet with encoder tu-resnet18 takes no argument 'dropout'",
        ),
        ({"args": {"aux_params": {"dropout": 0.1}}}, None, "model.args.aux_params: the classification head learns"),
        ({"args": {"aux_params": {"classes": 4}}}, PRESENCE, "model.args.aux_params.classes: set by model.numClasses"),
        ({"args": {"aux_params": "yes"}}, PRESENCE, "model.args.aux_params: must be an object"),
    ],
)
def test_bad_args_name_their_key(tmp_path: Path, shapes: Path, model: dict[str, Any], loss: Any, reason: str
                                 ) -> None:  # fmt: skip
    job = seg_job(tmp_path, shapes, model=model, **({"loss": loss} if loss else {}))
    with pytest.raises(InvalidInput) as error:
        build_segmentation_model(job, 4)
    assert str(error.value).startswith(reason) and "\n" not in str(error.value), str(error.value)


def test_presence_without_the_head_is_refused(tmp_path: Path, shapes: Path) -> None:
    job = seg_job(tmp_path, shapes, loss=PRESENCE)
    with pytest.raises(InvalidInput, match=r"presence trains smp's classification head: set model\.args\.aux_params"):
        LOSSES.get("presence").build(job, TaskData(splits={}, num_classes=4))


@pytest.mark.parametrize("num_classes", [1, 4])
def test_presence_targets_are_the_classes_each_mask_holds(num_classes: int) -> None:
    rng = np.random.default_rng(num_classes)
    labels = max(num_classes, 2)
    masks = rng.integers(0, labels, size=(5, 6, 6))
    masks[0] = 0  # background only
    masks[1, :, :3] = 255  # ignored pixels are no class
    masks[2] = 255
    expected = np.array([[k in set(np.unique(mask)) for k in range(labels)] for mask in masks], dtype=np.float32)
    expected = expected[:, 1:] if num_classes == 1 else expected  # binary: is there foreground
    got = presence_targets(torch.from_numpy(masks), num_classes)
    np.testing.assert_array_equal(got.float().numpy(), expected)


def test_the_presence_loss_is_binary_cross_entropy_on_those_targets(tmp_path: Path, shapes: Path) -> None:
    job = seg_job(tmp_path, shapes, model={"args": {"aux_params": {}}}, loss=PRESENCE)
    loss = LOSSES.get("presence").build(job, TaskData(splits={}, num_classes=4))
    masks = torch.tensor([[[0, 1], [1, 255]], [[3, 3], [255, 255]]])
    logits = torch.tensor([[2.0, -1.0, 0.5, 0.0], [-3.0, 1.0, 0.0, 4.0]], requires_grad=True)
    present = np.array([[1, 1, 0, 0], [0, 0, 0, 1]])  # read off the masks by eye
    p = 1 / (1 + np.exp(-logits.detach().numpy()))
    expected = -np.mean(present * np.log(p) + (1 - present) * np.log(1 - p))
    value = loss(torch.zeros(2, 4, 2, 2), {"mask": masks, "presence_logits": logits})
    assert value.item() == pytest.approx(expected, rel=1e-6)
    value.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_the_auxiliary_head_trains_on_presence_and_metrics_use_the_masks(tmp_path: Path, shapes: Path) -> None:
    job = seg_job(tmp_path, shapes, model={"args": {"aux_params": {"dropout": 0.2}}}, loss=PRESENCE, epochs=1)
    trainer = Trainer(job, CPU)
    head = unwrap(trainer.c.model).classification_head  # type: ignore[union-attr]
    linear = [m for m in head.modules() if isinstance(m, torch.nn.Linear)]
    assert [m.out_features for m in linear] == [4]  # numClasses, set by Kiln
    before = {name: p.detach().clone() for name, p in head.named_parameters()}
    assert trainer.train_epoch()
    assert all(not torch.equal(p, before[name]) for name, p in head.named_parameters())
    assert trainer.c.objective.loss_terms()["presence"] > 0
    trainer.epoch += 1
    assert trainer.validate_if_due() is not None  # the evaluator and its metrics see the mask logits alone
    assert 0 <= trainer.latest_metrics["val/miou"] <= 1
