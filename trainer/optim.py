"""Optimizers and learning-rate schedules, each resolved by name through a registry.

Every schedule is a per-optimizer-step factor on ``optimizer.lr``: a linear warmup from ``warmupLr``, then
the named decay. ``plateau`` is a factor too (it shrinks by ``gamma`` after ``patience`` validations
without improvement), so all schedules share one ``LambdaLR`` and one checkpoint format.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

import torch
from timm.optim import create_optimizer_v2, get_optimizer_info, list_optimizers
from torch import nn

from kiln.api.learning import OptimizerSpec, SchedulerSpec
from kiln.trainer.registry import Registry

Factor = Callable[[int], float]


@dataclass(frozen=True)
class OptimizerInfo:
    name: str
    cls: type[torch.optim.Optimizer] | None  # None: built by timm's create_optimizer_v2
    has_momentum: bool
    has_betas: bool
    description: str
    default_betas: tuple[float, ...] = ()  # the optimizer's own betas; adan-style optimizers take three
    default_momentum: float | None = None  # Kiln's default where it differs from the optimizer's own


def _default_betas(cls: type) -> tuple[float, ...]:
    parameter = inspect.signature(cls).parameters.get("betas")
    default = parameter.default if parameter is not None else None
    return tuple(default) if isinstance(default, tuple) else ()


OPTIMIZERS: Registry[OptimizerInfo] = Registry("optimizer")
OPTIMIZERS.register(
    OptimizerInfo("sgd", torch.optim.SGD, True, False, "SGD with Nesterov momentum", default_momentum=0.9)
)
OPTIMIZERS.register(OptimizerInfo("adam", torch.optim.Adam, False, True, "Adam", (0.9, 0.999)))
OPTIMIZERS.register(
    OptimizerInfo("adamw", torch.optim.AdamW, False, True, "Adam with decoupled weight decay", (0.9, 0.999))
)
OPTIMIZERS.register(OptimizerInfo("rmsprop", torch.optim.RMSprop, True, False, "RMSprop"))
for _name in list_optimizers(with_description=False):
    assert isinstance(_name, str)  # with_description=False lists bare names
    _timm = get_optimizer_info(_name) if _name not in OPTIMIZERS else None
    # timm names apex and bitsandbytes optimizers by import path; neither is installed, so they cannot be built.
    if _timm is not None and isinstance(_timm.opt_class, type):
        OPTIMIZERS.register(
            OptimizerInfo(
                _name,
                None,
                _timm.has_momentum,
                _timm.has_betas,
                _timm.description or "timm create_optimizer_v2",
                _default_betas(_timm.opt_class),
            )
        )


def _param_groups(
    model: nn.Module, weight_decay: float, scaled: Collection[str] = frozenset(), scaled_lr: float | None = None
) -> list[dict[str, Any]]:
    """Biases and norm weights (1-d tensors) are exempt from weight decay. The parameters named in ``scaled`` (a
    pretrained encoder's) get two groups of their own at ``scaled_lr``, after the others: each group's lr is the
    base the schedule multiplies, so they follow warmup and decay at their scale, and group 0 stays the
    learning rate the run reports."""
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {(s, d): [] for s in (False, True) for d in (True, False)}
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups[(name in scaled, param.ndim > 1)].append(param)
    out: list[dict[str, Any]] = []
    for (is_scaled, decays), params in groups.items():
        if is_scaled and not scaled:
            continue  # no scaled part: the two groups every checkpoint before scaling had
        group = {"params": params, "weight_decay": weight_decay if decays else 0.0}
        out.append({**group, "lr": scaled_lr} if is_scaled else group)
    return out


def optimizer_kwargs(spec: OptimizerSpec, info: OptimizerInfo) -> dict[str, Any]:
    """The spec's hyperparameters that this optimizer takes. Betas and momentum only when the spec gives them,
    so each optimizer otherwise keeps its own (lion's beta2 is 0.99, adam's 0.999; Kiln's sgd uses 0.9 with
    Nesterov). A three-beta optimizer (adan) gets the spec's two and keeps its own third."""
    kwargs: dict[str, Any] = {"lr": spec.lr}
    momentum = spec.momentum if spec.momentum is not None else info.default_momentum
    if info.has_momentum and momentum is not None:
        kwargs["momentum"] = momentum
    if info.has_betas and spec.betas is not None:
        kwargs["betas"] = (*spec.betas, *info.default_betas[len(spec.betas) :])
    if info.name == "sgd":
        kwargs["nesterov"] = bool(momentum)
    return kwargs


def create_optimizer(
    spec: OptimizerSpec, model: nn.Module, scaled: Collection[str] = frozenset(), lr_scale: float = 1.0
) -> torch.optim.Optimizer:
    """The optimizer over every trainable parameter; those named in ``scaled`` learn at ``lr_scale`` times
    optimizer.lr (transfer learning's encoder or backbone)."""
    info = OPTIMIZERS.get(spec.name)
    kwargs = optimizer_kwargs(spec, info)
    if info.cls is None and not scaled:
        # timm builds its own parameter groups, with the same 1-d exemption from weight decay.
        return create_optimizer_v2(model, opt=spec.name, weight_decay=spec.weight_decay, **kwargs)
    groups = _param_groups(model, spec.weight_decay, scaled, spec.lr * lr_scale)
    if info.cls is None:
        return create_optimizer_v2(groups, opt=spec.name, weight_decay=spec.weight_decay, **kwargs)
    return info.cls(groups, **kwargs, **fused_kernel(info.cls, model))


FUSED_DEVICES = frozenset({"cpu", "cuda"})
"""Where torch's fused optimizer kernels run (torch >= 2.4 for the CPU ones)."""


def fused_kernel(cls: type[torch.optim.Optimizer], model: nn.Module) -> dict[str, Any]:
    """``fused=True`` where the class has a fused kernel and every trainable parameter is a float tensor on a
    device that runs it: one kernel per step instead of a Python loop over the tensors, with the same update
    and the same state_dict. AdamW on resnet10t on one CPU thread: 9 ms a step against 57-67 ms (about a fifth
    of the demo's training step). torch's default stays where the class has none (rmsprop)."""
    if "fused" not in inspect.signature(cls).parameters:
        return {}
    params = [p for p in model.parameters() if p.requires_grad]
    if not all(p.device.type in FUSED_DEVICES and p.is_floating_point() for p in params):
        return {}
    return {"fused": True}


@dataclass(frozen=True)
class Horizon:
    """What a schedule needs to know about the run, in optimizer steps."""

    total_steps: int
    steps_per_epoch: int
    warmup_steps: int


@dataclass(frozen=True)
class SchedulerInfo:
    name: str
    decay: Callable[[SchedulerSpec, Horizon, float], Factor]  # (spec, horizon, peak lr) -> factor after warmup
    description: str
    own_warmup: bool = False  # the decay includes its own ramp-up (onecycle)
    on_plateau: bool = False  # reacts to the validation metric


def _cosine(spec: SchedulerSpec, h: Horizon, lr: float) -> Factor:
    floor = spec.min_lr / lr
    span = max(h.total_steps - h.warmup_steps, 1)
    return lambda step: floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min((step - h.warmup_steps) / span, 1.0)))


def _step(spec: SchedulerSpec, h: Horizon, lr: float) -> Factor:
    return lambda step: spec.gamma ** (step // (spec.step_epochs * h.steps_per_epoch))


def _multistep(spec: SchedulerSpec, h: Horizon, lr: float) -> Factor:
    bounds = [m * h.steps_per_epoch for m in spec.milestones]
    return lambda step: spec.gamma ** sum(step >= b for b in bounds)


def _exponential(spec: SchedulerSpec, h: Horizon, lr: float) -> Factor:
    return lambda step: spec.gamma ** (step / h.steps_per_epoch)


def _constant(spec: SchedulerSpec, h: Horizon, lr: float) -> Factor:
    return lambda step: 1.0


def _onecycle(spec: SchedulerSpec, h: Horizon, lr: float) -> Factor:
    """Cosine up from lr/25 over the warmup (30% of the run by default), then cosine down to minLr."""
    rise = h.warmup_steps or max(int(0.3 * h.total_steps), 1)
    start, floor = 1 / 25, spec.min_lr / lr

    def factor(step: int) -> float:
        if step < rise:
            return start + (1 - start) * 0.5 * (1 - math.cos(math.pi * step / rise))
        progress = min((step - rise) / max(h.total_steps - rise, 1), 1.0)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


SCHEDULERS: Registry[SchedulerInfo] = Registry("scheduler")
for _info in (
    SchedulerInfo("cosine", _cosine, "cosine decay to minLr"),
    SchedulerInfo("step", _step, "multiply by gamma every stepEpochs"),
    SchedulerInfo("multistep", _multistep, "multiply by gamma at each milestone epoch"),
    SchedulerInfo("exponential", _exponential, "multiply by gamma every epoch, smoothly"),
    SchedulerInfo("plateau", _constant, "multiply by gamma after patience stale validations", on_plateau=True),
    SchedulerInfo("onecycle", _onecycle, "one cycle: cosine up, then cosine down", own_warmup=True),
    SchedulerInfo("none", _constant, "constant learning rate after warmup"),
):
    SCHEDULERS.register(_info)


class Schedule:
    """Warmup, then the named decay, times the plateau scale; stepped once per optimizer step."""

    def __init__(self, spec: SchedulerSpec, optimizer: torch.optim.Optimizer, horizon: Horizon, lr: float, mode: str):
        self.spec, self.horizon, self.mode = spec, horizon, mode
        self.info = SCHEDULERS.get(spec.name)
        self._decay = self.info.decay(spec, horizon, lr)
        self._warmup_start = min(spec.warmup_lr / lr, 1.0)
        self.plateau_scale, self.plateau_bad = 1.0, 0
        self.plateau_best: float | None = None
        self.lambda_lr = torch.optim.lr_scheduler.LambdaLR(optimizer, self.factor)

    def factor(self, step: int) -> float:
        warm = self.horizon.warmup_steps
        if step < warm and not self.info.own_warmup:
            return self._warmup_start + (1 - self._warmup_start) * step / warm
        return self._decay(step) * self.plateau_scale

    def step(self) -> None:
        self.lambda_lr.step()

    def observe(self, metric: float | None) -> None:
        """After each validation: count validations without improvement, for plateau."""
        if not self.info.on_plateau or metric is None:
            return
        better = self.plateau_best is None or (
            metric > self.plateau_best if self.mode == "max" else metric < self.plateau_best
        )
        if better:
            self.plateau_best, self.plateau_bad = metric, 0
            return
        self.plateau_bad += 1
        if self.plateau_bad > self.spec.patience:
            self.plateau_scale *= self.spec.gamma
            self.plateau_bad = 0

    @property
    def last_lr(self) -> float:
        return float(self.lambda_lr.get_last_lr()[0])

    def state_dict(self) -> dict[str, Any]:
        return {
            "last_epoch": self.lambda_lr.last_epoch,
            "plateau": [self.plateau_scale, self.plateau_best, self.plateau_bad],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.plateau_scale, self.plateau_best, self.plateau_bad = state["plateau"]
        self.lambda_lr.last_epoch = state["last_epoch"] - 1
        with warnings.catch_warnings():
            # Re-deriving the resumed step's learning rate before the first optimizer step is deliberate;
            # torch's "scheduler stepped before the optimizer" warning is about skipped values, and none is.
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
            self.lambda_lr.step()
