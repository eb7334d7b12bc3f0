"""Registries: duplicates raise, unknown names list the valid ones, and every entry builds."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from kiln.api.data import AugmentationSpec, Transform
from kiln.api.training import ModelSpec, OptimizerSpec, SchedulerSpec
from kiln.trainer.augment import PRESETS, train_pipeline, transforms_registry
from kiln.trainer.errors import InvalidInput
from kiln.trainer.models import MODELS, build_model, load_pretrained
from kiln.trainer.optim import OPTIMIZERS, SCHEDULERS, Horizon, Schedule, create_optimizer
from kiln.trainer.registry import Registry, UnknownName
from kiln.trainer.tasks import TASKS


@dataclass(frozen=True)
class Info:
    name: str


def test_duplicate_registration_raises() -> None:
    registry: Registry[Info] = Registry("thing")
    registry.register(Info("a"))
    with pytest.raises(ValueError, match="already registered"):
        registry.register(Info("a"))


def test_unknown_name_lists_close_matches_and_valid_names() -> None:
    with pytest.raises(UnknownName, match=r"unknown optimizer 'adamww'; did you mean adamw.*valid: "):
        OPTIMIZERS.get("adamww")


@pytest.mark.parametrize("name", [*MODELS.names(), "resnet10t", "test_vit"])
def test_models_build_and_run(name: str) -> None:
    model = build_model(ModelSpec(architecture=name), num_classes=4).eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 4)


def test_unknown_timm_model_suggests_names() -> None:
    with pytest.raises(InvalidInput, match=r"'resnet1000'.*did you mean"):
        build_model(ModelSpec(architecture="resnet1000"), num_classes=2)


def test_pretrained_needs_an_explicit_uri(tmp_path: pytest.TempPathFactory) -> None:
    model = build_model(ModelSpec(architecture="debug"), num_classes=3)
    with pytest.raises(InvalidInput, match="no model hub"):
        load_pretrained(model, "imagenet")


def test_pretrained_from_file_skips_the_mismatched_head(tmp_path: object) -> None:
    from pathlib import Path

    source = build_model(ModelSpec(architecture="debug"), num_classes=5)
    path = Path(str(tmp_path)) / "weights.pt"
    torch.save(source.state_dict(), path)
    target = build_model(ModelSpec(architecture="debug", pretrained=str(path)), num_classes=3)
    conv = "features.0.0.weight"
    assert torch.equal(target.state_dict()[conv], source.state_dict()[conv])


def test_model_plugin_by_module_path() -> None:
    model = build_model(ModelSpec(architecture="custom", source="kiln.trainer.models:DebugCNN"), num_classes=2)
    assert model(torch.randn(1, 3, 16, 16)).shape == (1, 2)


@pytest.mark.parametrize("name", [*[i.name for i in OPTIMIZERS if i.cls is not None], "lamb", "lion", "adan"])
def test_optimizers_step(name: str) -> None:
    model = torch.nn.Linear(4, 2)
    optimizer = create_optimizer(OptimizerSpec(name=name, lr=0.01), model)
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()


@pytest.mark.parametrize("name", SCHEDULERS.names())
def test_schedules_warm_up_then_decay(name: str) -> None:
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    spec = SchedulerSpec(name=name, warmup_epochs=1, warmup_lr=0.001, step_epochs=2, milestones=[2, 3], patience=0)
    schedule = Schedule(spec, optimizer, Horizon(total_steps=50, steps_per_epoch=10, warmup_steps=10), 0.1, "max")
    lrs = []
    for step in range(50):
        lrs.append(schedule.last_lr)
        optimizer.step()
        schedule.step()
        if step % 10 == 9:
            schedule.observe(0.5)  # a flat metric: plateau decays
    assert all(lr > 0 for lr in lrs)
    assert max(lrs) <= 0.1 + 1e-9
    assert lrs[0] < lrs[9] or SCHEDULERS.get(name).own_warmup
    restored = Schedule(spec, optimizer, Horizon(50, 10, 10), 0.1, "max")
    restored.load_state_dict(schedule.state_dict())
    assert restored.factor(49) == pytest.approx(schedule.factor(49))
    assert restored.lambda_lr.last_epoch == schedule.lambda_lr.last_epoch


@pytest.mark.parametrize("preset", PRESETS.names())
def test_augmentation_presets_build_and_apply(preset: str) -> None:
    pipeline = train_pipeline(AugmentationSpec(preset=preset), 24, (0.5,) * 3, (0.5,) * 3)  # type: ignore[arg-type]
    out = pipeline(image=(torch.rand(30, 40, 3) * 255).numpy().astype("uint8"))["image"]
    assert out.shape == (3, 24, 24)


def test_unknown_albumentations_transform() -> None:
    spec = AugmentationSpec(transforms=[Transform(name="HorizontalFlipp")])
    with pytest.raises(InvalidInput, match=r"unknown albumentations transform 'HorizontalFlipp'; did you mean"):
        train_pipeline(spec, 16, (0.5,) * 3, (0.5,) * 3)
    assert "HorizontalFlip" in transforms_registry()


def test_bad_transform_arguments_name_the_field() -> None:
    spec = AugmentationSpec(transforms=[Transform(name="HorizontalFlip", args={"nonsense": 1})])
    with pytest.raises(InvalidInput, match=r"augmentation.transforms\[0\]"):
        train_pipeline(spec, 16, (0.5,) * 3, (0.5,) * 3)


def test_tasks_registry_has_classification_segmentation_and_detection() -> None:
    assert TASKS.names() == ["classification", "detection", "segmentation"]
