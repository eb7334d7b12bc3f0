"""Every optimizer gets the hyperparameters the spec gives it, and keeps its own defaults otherwise."""

from __future__ import annotations

import pytest
import torch
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


def dense_model(seed: int = 0) -> nn.Module:
    """No conv bias before the norm: its gradient is ~0, where Adam's g / sqrt(v) is rounding noise."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))


def trained(optimizer_name: str, *, fused: bool, steps: int = 3) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A few steps of the optimizer Kiln builds, or of the same one (same groups) on torch's for-loop kernel."""
    net = dense_model()
    optimizer = create_optimizer(OptimizerSpec(name=optimizer_name, lr=0.01, weight_decay=0.01), net)
    if not fused:
        groups = [{**group, "fused": False, "foreach": False} for group in optimizer.param_groups]
        optimizer = type(optimizer)(groups)
    torch.manual_seed(1)
    for _ in range(steps):
        optimizer.zero_grad()
        net(torch.randn(4, 3, 8, 8)).square().mean().backward()
        optimizer.step()
    return net, optimizer


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_torchs_own_optimizers_run_the_fused_kernel_on_cpu_and_match_the_loop(name: str) -> None:
    built = create_optimizer(OptimizerSpec(name=name), dense_model())
    assert all(group["fused"] for group in built.param_groups), built.param_groups[0]
    kiln, _ = trained(name, fused=True)
    loop, _ = trained(name, fused=False)
    for a, b in zip(kiln.parameters(), loop.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_checkpoint_from_the_loop_kernel_resumes_on_the_fused_one() -> None:
    """Checkpoints written before Kiln chose the fused kernel hold the for-loop optimizer's state."""
    _, loop = trained("adamw", fused=False, steps=2)
    net, fused = trained("adamw", fused=True, steps=0)
    fused.load_state_dict(loop.state_dict())
    net(torch.randn(4, 3, 8, 8)).square().mean().backward()
    fused.step()
    assert all(state["step"].item() == 3 for state in fused.state.values())


def test_rmsprop_has_no_fused_kernel_and_keeps_torchs_default() -> None:
    assert not create_optimizer(OptimizerSpec(name="rmsprop"), dense_model()).defaults.get("fused")
