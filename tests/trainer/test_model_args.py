"""model.args reach the network's constructor (timm, a Kiln flavor, smp, a plugin), and a keyword it does not take,
or one Kiln sets itself, is a one-line invalid input naming model.args.<key>."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from inprocess import run_main
from trainer_testkit import make_job

from kiln.api.contract import ExitCode
from kiln.api.model import ModelSpec
from kiln.trainer.errors import InvalidInput
from kiln.trainer.models import DebugCNN, build_model, classifier_paths

pytestmark = pytest.mark.timeout(60)


def spec(architecture: str, **fields: Any) -> ModelSpec:
    return ModelSpec.model_validate({"architecture": architecture, **fields})


def test_args_reach_a_timm_model() -> None:
    model = build_model(spec("resnet18", args={"drop_rate": 0.25, "drop_path_rate": 0.1}), num_classes=3)
    assert model.drop_rate == 0.25  # type: ignore[attr-defined]
    assert model.get_classifier().out_features == 3  # type: ignore[operator]
    paths = [module.drop_path for module in model.modules() if hasattr(module, "drop_path")]
    assert any(getattr(path, "drop_prob", 0) > 0 for path in paths)


def test_args_reach_a_kiln_flavor() -> None:
    model = build_model(spec("debug", args={"in_chans": 1}), num_classes=3)
    assert isinstance(model, DebugCNN) and model.features[0][0].in_channels == 1
    assert model(torch.zeros(2, 1, 16, 16)).shape == (2, 3)


@pytest.mark.parametrize(
    ("architecture", "args", "reason"),
    [
        ("debug", {"drop_rate": 0.1}, "model.args.drop_rate: debug takes no argument 'drop_rate'"),
        ("debug", {"width": 16}, "model.args.width: debug sets 'width' itself"),
        ("resnet18", {"dropout": 0.1}, "model.args.dropout: resnet18 takes no argument 'dropout'"),
        ("resnet18", {"num_classes": 10}, "model.args.num_classes: set by model.numClasses"),
        ("resnet18", {"pretrained": True}, "model.args.pretrained: set by model.pretrained"),
    ],
)
def test_a_keyword_the_constructor_does_not_take_names_its_key(architecture: str, args: dict[str, Any], reason: str
                                                               ) -> None:  # fmt: skip
    with pytest.raises(InvalidInput) as error:
        build_model(spec(architecture, args=args), num_classes=3)
    assert str(error.value).startswith(reason) and "\n" not in str(error.value)


def test_a_bad_argument_ends_the_run_with_exit_2(isolated: Path, tiny_data: Path) -> None:
    job = make_job(isolated, tiny_data, epochs=1, model={"architecture": "debug", "args": {"drop_rate": 0.1}})
    code, message = run_main(isolated, job)
    assert code == ExitCode.INVALID and message["exitCode"] == ExitCode.INVALID
    assert message["reason"] == "model.args.drop_rate: debug takes no argument 'drop_rate'"


PLUGIN = """
from torch import nn


def factory(num_classes: int, hidden: int = 4) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, hidden, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(hidden, num_classes))
"""


def test_args_reach_a_plugin_factory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "kiln_test_args_plugin.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    source = "kiln_test_args_plugin:factory"
    model = build_model(spec("custom", source=source, args={"hidden": 7}), num_classes=3)
    assert model[0].out_channels == 7  # type: ignore[index]
    with pytest.raises(InvalidInput, match=rf"^model\.args\.depth: model\.source {source} takes no argument 'depth'$"):
        build_model(spec("custom", source=source, args={"depth": 2}), num_classes=3)


@pytest.mark.parametrize(
    ("architecture", "expected"),
    [("debug", ("head",)), ("resnet18", ("fc",)), ("convnext_atto", ("head.fc",))],
)
def test_the_classifier_head_is_found_from_the_models_metadata(architecture: str, expected: tuple[str, ...]) -> None:
    assert classifier_paths(build_model(spec(architecture), num_classes=3)) == expected
