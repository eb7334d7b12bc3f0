"""loss.schedule in the trainer: the engine tells the objective each epoch, the loss weighs its terms with that
epoch's weights, they are logged as train/loss_weight/<name>, and a restarted run picks them up again."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from inprocess import CPU, run_main, summary
from trainer_testkit import make_job, merge, metrics_records

from kiln.api.resolve import ResolvedTrainingJob
from kiln.trainer.preemption import PreemptionFlag
from kiln.trainer.shapes import write_shapes
from kiln.trainer.tasks.base import TaskData
from kiln.trainer.tasks.classification import ClassificationTask
from kiln.trainer.tasks.segmentation import LOSSES, SegmentationTask
from kiln.trainer.trainer import Trainer

pytestmark = pytest.mark.timeout(180)

FOLDER = {"format": "segmentation-folder"}
SEGMENTATION: dict[str, Any] = {
    "task": "segmentation",
    # A network small enough to train in seconds on a CPU core, as in test_segmentation.
    "model": {"architecture": "unet", "encoder": "tu-tf_mobilenetv3_small_minimal_100", "numClasses": 4},
    "data": {"train": FOLDER, "val": FOLDER, "imageSize": 32, "batchSize": 4},
    "optimizer": {"name": "adamw", "lr": 0.01},
}


def keyframe(epoch: int, **weights: float) -> dict[str, Any]:
    return {"epoch": epoch, "weights": weights}


# Two epochs: dice rises from 0.2 to 0.8 while cross-entropy falls.
TWO_EPOCHS = [keyframe(0, dice=0.2, cross_entropy=0.8), keyframe(1, dice=0.8, cross_entropy=0.2)]


def seg_job(root: Path, dataset: Path, /, **overrides: Any) -> ResolvedTrainingJob:
    return make_job(root, dataset, **merge(SEGMENTATION, overrides))


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 train and 4 val pairs: two optimizer steps an epoch at batchSize 4."""
    return write_shapes(tmp_path_factory.mktemp("shapes"), splits={"train": 8, "val": 4}, size=32)


def segmentation_inputs() -> tuple[torch.Tensor, dict[str, Any]]:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 16, 16, generator=generator)
    return logits, {"mask": torch.randint(0, 4, (2, 16, 16), generator=generator)}


def test_the_loss_weighs_its_terms_with_the_weights_of_the_epoch(tmp_path: Path) -> None:
    schedule = [keyframe(0, dice=0.2, cross_entropy=0.8), keyframe(4, dice=0.8, cross_entropy=0.2)]
    job = seg_job(tmp_path, tmp_path, epochs=6, loss={"schedule": schedule})
    data = TaskData(splits={}, num_classes=4)
    objective = SegmentationTask().build_objective(job, data)
    logits, batch = segmentation_inputs()
    dice = float(LOSSES.get("dice").build(job, data)(logits, batch))
    cross_entropy = float(LOSSES.get("cross_entropy").build(job, data)(logits, batch))
    assert abs(dice - cross_entropy) > 0.1, "the terms must differ for the weights to show"
    # (epoch, dice weight, cross-entropy weight), by hand: a quarter of 0.6 per epoch from 0.2/0.8 to 0.8/0.2.
    for epoch, w_dice, w_ce in [(0, 0.2, 0.8), (1, 0.35, 0.65), (2, 0.5, 0.5), (3, 0.65, 0.35), (4, 0.8, 0.2),
                                (5, 0.8, 0.2)]:  # fmt: skip
        objective.set_epoch(epoch)
        assert objective.loss_weights() == pytest.approx({"dice": w_dice, "cross_entropy": w_ce}), epoch
        expected = w_dice * dice + w_ce * cross_entropy
        assert float(objective.loss(logits, batch)) == pytest.approx(expected, rel=1e-5), epoch

    fixed = SegmentationTask().build_objective(seg_job(tmp_path, tmp_path, epochs=6), data)
    fixed.set_epoch(3)
    assert fixed.loss_weights() == {}, "fixed weights are not logged"
    assert float(fixed.loss(logits, batch)) == pytest.approx(0.5 * dice + 0.5 * cross_entropy)


def test_a_one_term_schedule_scales_classification_loss(tmp_path: Path) -> None:
    schedule = [keyframe(0, cross_entropy=1.0), keyframe(2, cross_entropy=0.5)]
    job = make_job(tmp_path, tmp_path, epochs=3, loss={"schedule": schedule})
    objective = ClassificationTask().build_objective(job, TaskData(splits={}, num_classes=3))
    generator = torch.Generator().manual_seed(0)
    logits, target = torch.randn(4, 3, generator=generator), torch.tensor([0, 1, 2, 1])
    plain = float(F.cross_entropy(logits, target))
    objective.set_epoch(1)
    assert objective.loss_weights() == pytest.approx({"cross_entropy": 0.75})
    assert float(objective.loss(logits, {"target": target})) == pytest.approx(0.75 * plain)


def assert_logged(record: dict[str, Any], weights: dict[str, float]) -> None:
    """The record logs the epoch's weights, and its train/loss is the sum of its terms under them: the logged
    weights are the ones the loss used (train/loss and train/loss/<name> average the same steps)."""
    assert {name: record[f"train/loss_weight/{name}"] for name in weights} == pytest.approx(weights)
    weighted = sum(weight * record[f"train/loss/{name}"] for name, weight in weights.items())
    assert record["train/loss"] == pytest.approx(weighted, rel=1e-5)


def test_the_epoch_hook_moves_the_weights_in_a_run(isolated: Path, shapes: Path) -> None:
    job = seg_job(isolated, shapes, epochs=2, loss={"schedule": TWO_EPOCHS})
    code, message = run_main(isolated, job)
    assert code == 0, message
    first, second = metrics_records(Path(job.run_uri))
    assert (first["epoch"], second["epoch"]) == (1, 2)
    assert_logged(first, {"dice": 0.2, "cross_entropy": 0.8})
    assert_logged(second, {"dice": 0.8, "cross_entropy": 0.2})


def test_a_restarted_run_picks_up_the_weights_of_its_epoch(
    isolated: Path, shapes: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = seg_job(isolated, shapes, epochs=2, loss={"schedule": TWO_EPOCHS})
    preemption = PreemptionFlag()
    interrupted = Trainer(job, CPU, preemption=preemption)
    objective, set_epoch = interrupted.c.objective, interrupted.c.objective.set_epoch

    def preempt_in_the_second_epoch(epoch: int) -> None:  # a SIGTERM during its first step
        set_epoch(epoch)
        if epoch == 1:
            preemption.set()

    monkeypatch.setattr(objective, "set_epoch", preempt_in_the_second_epoch)
    assert interrupted.train() == "preempted"
    assert (interrupted.epoch, interrupted.batch) == (1, 1), "stopped one step into the second epoch"

    resumed = Trainer(job, CPU)
    assert resumed.train() == "completed"
    assert (resumed.epoch, resumed.step) == (2, 4)
    records = metrics_records(Path(job.run_uri))
    assert [r["epoch"] for r in records] == [1, 2]
    assert_logged(records[1], {"dice": 0.8, "cross_entropy": 0.2})

    # A restart with nothing left to train evaluates the best checkpoint again: with the weights the run ended
    # on, so the loss it reports is the one the uninterrupted evaluation reported.
    evaluated = summary(job)["evaluation"]["metrics"]["loss"]
    again = Trainer(job, CPU)
    assert again.train() == "completed"
    assert again.c.objective.loss_weights() == {"dice": 0.8, "cross_entropy": 0.2}
    assert summary(job)["evaluation"]["metrics"]["loss"] == pytest.approx(evaluated, rel=1e-6)
