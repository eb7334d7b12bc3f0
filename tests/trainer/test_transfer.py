"""Transfer learning: a backbone or encoder frozen for the first epochs and trained at its own learning rate, in
one process, under DDP and across resume."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from inprocess import build_trainer
from torch import nn
from trainer_testkit import REPO, make_job, merge, trainer_env, write_spec

from kiln.trainer.distributed import unwrap
from kiln.trainer.shapes import write_shapes
from kiln.trainer.trainer import Trainer

pytestmark = pytest.mark.timeout(120)

# DebugCNN: the backbone is features.*, the classifier head (pretrained_cfg["classifier"]) is head.*
BACKBONE = {"architecture": "debug", "freezeBackbone": {"epochs": 1}}
# Small enough for a CPU core: smp's Unet on resnet18 at 32 px. The encoder is encoder.*, the rest decoder.* and
# segmentation_head.*
SEGMENTATION: dict[str, Any] = {
    "task": "segmentation",
    "model": {"architecture": "unet", "encoder": "resnet18", "numClasses": 4, "freezeEncoder": {"epochs": 1}},
    "data": {"train": {"format": "segmentation-folder"}, "val": {"format": "segmentation-folder"}, "imageSize": 32},
}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_shapes(tmp_path_factory.mktemp("shapes"), splits={"train": 8, "val": 4}, size=32)


def tensors(model: nn.Module, prefix: str, *, inside: bool = True) -> dict[str, torch.Tensor]:
    """Copies of the parameters and buffers whose names start with ``prefix`` (or, inside=False, do not)."""
    state = unwrap(model).state_dict()
    return {name: value.clone() for name, value in state.items() if name.startswith(prefix) == inside}


def changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    return {name for name, value in before.items() if not torch.equal(value, after[name])}


def frozen_part(trainer: Trainer, prefix: str) -> tuple[list[nn.Parameter], list[nn.Module]]:
    model = unwrap(trainer.c.model)
    params = [p for name, p in model.named_parameters() if name.startswith(prefix)]
    norms = [m for name, m in model.named_modules() if name.startswith(prefix) and isinstance(m, nn.BatchNorm2d)]
    return params, norms


@pytest.mark.parametrize("task", ["classification", "segmentation"])
def test_a_frozen_part_does_not_move_until_it_unfreezes(tmp_path: Path, tiny_data: Path, shapes: Path, task: str
                                                        ) -> None:  # fmt: skip
    if task == "classification":
        trainer, part = build_trainer(tmp_path, tiny_data, model=BACKBONE, epochs=2), "features."
    else:
        trainer, part = build_trainer(tmp_path, shapes, **merge(SEGMENTATION, {"epochs": 2})), "encoder."
    params, norms = frozen_part(trainer, part)
    assert params and norms
    start_part, start_rest = tensors(trainer.c.model, part), tensors(trainer.c.model, part, inside=False)

    assert trainer.train_epoch()  # epoch 1 of 2: frozen
    assert not any(p.requires_grad for p in params)  # no gradient is computed for it, so no backward through it
    assert not any(norm.training for norm in norms)  # running statistics kept, not re-estimated
    assert changed(start_part, tensors(trainer.c.model, part)) == set()  # weights and BatchNorm statistics
    trained = changed(start_rest, tensors(trainer.c.model, part, inside=False))
    assert any(name.endswith("weight") for name in trained), "the rest of the network trains"

    trainer.epoch, trainer.batch = 1, 0
    assert trainer.train_epoch()  # epoch 2: unfrozen
    assert all(p.requires_grad for p in params) and all(norm.training for norm in norms)
    assert changed(start_part, tensors(trainer.c.model, part)) == set(start_part)  # statistics included


def test_the_unfreeze_is_logged_once(tmp_path: Path, tiny_data: Path, caplog: pytest.LogCaptureFixture) -> None:
    trainer = build_trainer(tmp_path, tiny_data, model={**BACKBONE, "freezeBackbone": {"epochs": 2}}, epochs=3)
    with caplog.at_level("INFO", logger="kiln.trainer.transfer"):
        trainer.train()
    unfreezes = [r.getMessage() for r in caplog.records if "unfreezes" in r.getMessage()]
    assert unfreezes == ["epoch 3: the backbone unfreezes after 2 frozen epoch(s); the whole network trains"]


def group_lrs(trainer: Trainer) -> tuple[set[float], set[float]]:
    """The learning rates of the groups holding backbone (features.*) and head parameters."""
    model = unwrap(trainer.c.model)
    backbone = {id(p) for name, p in model.named_parameters() if name.startswith("features.")}
    head = {id(p) for name, p in model.named_parameters() if name.startswith("head.")}
    groups = [g for g in trainer.c.optimizer.param_groups if g["params"]]
    for group in groups:  # each group is wholly one part or the other
        ids = {id(p) for p in group["params"]}
        assert ids <= backbone or ids <= head
    return (
        {g["lr"] for g in groups if {id(p) for p in g["params"]} <= backbone},
        {g["lr"] for g in groups if {id(p) for p in g["params"]} <= head},
    )


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step:UserWarning")  # it steps without training
def test_the_backbone_learns_at_its_scale_through_warmup_and_decay(tmp_path: Path, tiny_data: Path) -> None:
    scheduler = {"name": "step", "stepEpochs": 1, "gamma": 0.5, "warmupEpochs": 1, "warmupLr": 0.001}
    overrides = {"model": {"architecture": "debug", "backboneLrScale": 0.1}, "scheduler": scheduler, "epochs": 3}
    trainer = build_trainer(tmp_path, tiny_data, optimizer={"name": "sgd", "lr": 0.1}, **overrides)
    seen = []
    for _ in range(3 * trainer.c.horizon.steps_per_epoch):
        (backbone,), (head,) = group_lrs(trainer)
        assert backbone == pytest.approx(0.1 * head), trainer.c.schedule.lambda_lr.last_epoch
        assert trainer.c.schedule.last_lr == head  # the reported learning rate is the head's, optimizer.lr's
        seen.append(head)
        trainer.c.schedule.step()
    peak = seen.index(max(seen))  # up through the warmup from warmupLr, then down by gamma each epoch
    assert seen[0] == pytest.approx(0.001) and 0 < peak < len(seen) - 1 and seen[-1] < max(seen) / 2
    # The groups, and their learning rates, survive a checkpoint.
    state = trainer.state_dict()
    resumed = build_trainer(tmp_path / "again", tiny_data, optimizer={"name": "sgd", "lr": 0.1}, **overrides)
    resumed.load_state_dict(state)
    assert group_lrs(resumed) == group_lrs(trainer)


def final_weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    """The weights training ended on, from the last epoch's checkpoint (the model itself then holds the best
    checkpoint's, which evaluate_best loaded)."""
    state = trainer.c.checkpointer.load_latest()
    assert state is not None and state["epoch"] == trainer.spec.epochs
    return state["model"]  # type: ignore[no-any-return]


@pytest.mark.parametrize("stop_after", [1, 3], ids=["during-the-freeze", "after-the-unfreeze"])
def test_resume_lands_in_the_phase_of_its_epoch(tmp_path: Path, tiny_data: Path, stop_after: int) -> None:
    spec = {"model": {**BACKBONE, "freezeBackbone": {"epochs": 2}, "backboneLrScale": 0.5}, "epochs": 4}
    uninterrupted = build_trainer(tmp_path / "whole", tiny_data, **spec)
    uninterrupted.train()
    first = build_trainer(tmp_path / "split", tiny_data, **spec)
    for _ in range(stop_after):  # what train() does, up to a preemption right after the epoch
        assert first.train_epoch()
        first.epoch, first.batch = first.epoch + 1, 0
        first.validate_if_due()
    first.save_checkpoint(score=None)
    second = build_trainer(tmp_path / "split", tiny_data, **spec)  # same checkpoint location: resume: auto
    second.train()
    assert second.step == uninterrupted.step
    expected, actual = final_weights(uninterrupted), final_weights(second)
    assert changed(expected, actual) == set()


DUMP_WEIGHTS = """
import sys
import torch
from kiln.trainer.distributed import unwrap
from kiln.trainer.train import main
from kiln.trainer.trainer import Trainer

out, train_epoch = sys.argv.pop(1), Trainer.train_epoch


def dump(trainer, label):
    params = {name: p.detach().clone() for name, p in unwrap(trainer.c.model).named_parameters()}
    torch.save(params, f"{out}/rank{trainer.world.rank}-{label}.pt")


def recorded(trainer):
    if trainer.epoch == 0:
        dump(trainer, "start")
    finished = train_epoch(trainer)
    dump(trainer, f"epoch{trainer.epoch + 1}")
    return finished


Trainer.train_epoch = recorded
sys.exit(main())
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_processes_train_across_the_unfreeze_and_agree(tmp_path: Path, tiny_data: Path) -> None:
    """DDP registers the parameters that require a gradient when it is built: the unfreeze rebuilds it, with
    gradient accumulation (no_sync), clipping and EMA on, and every rank ends with the same weights."""
    job = make_job(
        tmp_path, tiny_data, epochs=3, resources={"procsPerNode": 2}, data={"batchSize": 4}, gradAccumulation=2,
        gradClip=1.0, ema={"enabled": True, "decay": 0.5}, model={**BACKBONE, "backboneLrScale": 0.5},
    )  # fmt: skip
    script, out = tmp_path / "dump_weights.py", tmp_path / "weights"
    script.write_text(textwrap.dedent(DUMP_WEIGHTS))
    out.mkdir()
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc-per-node", "2",
        str(script), str(out), "--spec", str(write_spec(job, tmp_path / "spec.json")),
    ]  # fmt: skip
    env = trainer_env(tmp_path)
    result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=280, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "epoch 2: the backbone unfreezes after 1 frozen epoch(s)" in result.stderr
    weights = {p.stem: torch.load(p) for p in out.glob("*.pt")}
    for label in ("start", "epoch1", "epoch2", "epoch3"):
        assert changed(weights[f"rank0-{label}"], weights[f"rank1-{label}"]) == set(), label
    start, frozen, thawed = weights["rank0-start"], weights["rank0-epoch1"], weights["rank0-epoch3"]
    assert changed(start, frozen) == {"head.weight", "head.bias"}  # the frozen epoch moved the head alone
    assert changed(frozen, thawed) == set(start)
    summary = json.loads((Path(job.run_uri) / "summary.json").read_text())
    assert summary["state"] == "completed" and summary["progress"]["epoch"] == 3
