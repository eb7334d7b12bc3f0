"""Every optimizer gets the hyperparameters the spec gives it, and keeps its own defaults otherwise."""

from __future__ import annotations

import pytest
from torch import nn

from kiln.api.learning import OptimizerSpec
from kiln.trainer.optim import OPTIMIZERS, create_optimizer


def model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))


@pytest.mark.parametrize("name", ["adamw", "lion", "lamb", "nadamw", "adan", "adabelief"])
def test_betas_reach_every_optimizer_that_takes_them(name: str) -> None:
    optimizer = create_optimizer(OptimizerSpec(name=name, betas=[0.8, 0.95]), model())
    betas = optimizer.param_groups[0]["betas"]
    assert tuple(betas[:2]) == (0.8, 0.95), (name, betas)
    if name == "adan":
        assert len(betas) == 3 and betas[2] == OPTIMIZERS.get("adan").default_betas[2], "adan keeps its third beta"


@pytest.mark.parametrize(("name", "own"), [("lion", (0.9, 0.99)), ("adamw", (0.9, 0.999))])
def test_an_optimizer_keeps_its_own_betas_when_the_spec_gives_none(name: str, own: tuple[float, float]) -> None:
    assert tuple(create_optimizer(OptimizerSpec(name=name), model()).param_groups[0]["betas"]) == own


@pytest.mark.parametrize(("name", "momentum"), [("sgd", 0.5), ("lars", 0.7), ("rmsprop", 0.3)])
def test_momentum_reaches_every_optimizer_that_takes_it(name: str, momentum: float) -> None:
    optimizer = create_optimizer(OptimizerSpec(name=name, momentum=momentum), model())
    assert optimizer.param_groups[0]["momentum"] == momentum


def test_sgd_defaults_to_nesterov_momentum() -> None:
    group = create_optimizer(OptimizerSpec(name="sgd"), model()).param_groups[0]
    assert (group["momentum"], group["nesterov"]) == (0.9, True)


def test_weight_decay_spares_biases_and_norm_weights_for_timm_optimizers_too() -> None:
    optimizer = create_optimizer(OptimizerSpec(name="lion", weight_decay=0.1), model())
    decays = {p.ndim: g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert decays[1] == 0.0 and decays[4] == 0.1
