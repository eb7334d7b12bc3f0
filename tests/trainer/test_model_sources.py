"""Where the network comes from: pretrained weights by explicit URI (file, S3) and model plugins
(``module:factory`` and entry points in group ``kiln.models``), including the ways each can be wrong."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
from inprocess import build_trainer, run_main
from trainer_testkit import make_job

from kiln.api.contract import ExitCode
from kiln.storage import open_store
from kiln.testing.s3 import S3Server
from kiln.trainer.distributed import unwrap
from kiln.trainer.models import DebugCNN

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def weights(tmp_path: Path) -> dict[str, torch.Tensor]:
    """A 'debug' network's state, seeded differently from what the trainer would initialize."""
    torch.manual_seed(1234)
    state = DebugCNN(num_classes=3, width=8).state_dict()
    torch.save(state, tmp_path / "weights.pt")
    return state


def assert_same_weights(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    actual = unwrap(model).state_dict()
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(actual[name], tensor), name


def test_pretrained_from_a_file_initializes_every_weight(
    tmp_path: Path, tiny_data: Path, weights: dict[str, torch.Tensor]
) -> None:
    trainer = build_trainer(
        tmp_path, tiny_data, model={"architecture": "debug", "pretrained": str(tmp_path / "weights.pt")}
    )
    assert_same_weights(trainer.c.model, weights)
    assert trainer.c.ema is None


def test_pretrained_from_a_file_seeds_the_ema_too(
    tmp_path: Path, tiny_data: Path, weights: dict[str, torch.Tensor]
) -> None:
    trainer = build_trainer(
        tmp_path, tiny_data, model={"architecture": "debug", "pretrained": f"file://{tmp_path / 'weights.pt'}"},
        ema={"enabled": True, "decay": 0.99},
    )  # fmt: skip
    assert trainer.c.ema is not None
    assert_same_weights(trainer.c.ema.module, weights)


def test_pretrained_from_s3(
    tmp_path: Path, tiny_data: Path, weights: dict[str, torch.Tensor], s3_server: S3Server, s3_bucket: str
) -> None:
    open_store(f"s3://{s3_bucket}/models", s3_server.storage()).upload_file("debug/weights.pt", tmp_path / "weights.pt")
    trainer = build_trainer(
        tmp_path, tiny_data, model={"architecture": "debug", "pretrained": f"s3://{s3_bucket}/models/debug/weights.pt"},
        storage={"endpointUrl": s3_server.endpoint_url},
    )  # fmt: skip
    assert_same_weights(trainer.c.model, weights)


def test_pretrained_from_a_kiln_checkpoint(tmp_path: Path, tiny_data: Path) -> None:
    """A Kiln state.pt also pickles numpy RNG states; weights_only loading must still accept it."""
    source = build_trainer(tmp_path / "source", tiny_data)
    source.save_checkpoint(score=None)
    checkpoint = source.c.checkpointer.uri(source.c.checkpointer.latest)
    assert checkpoint is not None
    trainer = build_trainer(tmp_path, tiny_data, seed=7, model={"architecture": "debug", "pretrained": checkpoint})
    assert_same_weights(trainer.c.model, unwrap(source.c.model).state_dict())


def test_resume_from_another_jobs_checkpoint_seeds_the_ema(tmp_path: Path, tiny_data: Path) -> None:
    """checkpoint.resume: <uri> loads weights after the EMA copy exists; the EMA must start from them too."""
    source = build_trainer(tmp_path / "source", tiny_data)
    source.save_checkpoint(score=None)
    checkpoint = source.c.checkpointer.uri(source.c.checkpointer.latest)
    trainer = build_trainer(
        tmp_path, tiny_data, seed=7, checkpoint={"resume": checkpoint}, ema={"enabled": True, "decay": 0.999}
    )
    trainer.resume()
    assert trainer.c.ema is not None and trainer.step == 0  # the weights, none of the progress
    expected = unwrap(source.c.model).state_dict()
    assert_same_weights(trainer.c.model, expected)
    assert_same_weights(trainer.c.ema.module, expected)


def test_pretrained_file_that_is_missing_exits_2(isolated: Path, tiny_data: Path) -> None:
    job = make_job(isolated, tiny_data, epochs=1, model={"architecture": "debug", "pretrained": "/nowhere/w.pt"})
    code, message = run_main(isolated, job)
    assert code == ExitCode.INVALID and message["exitCode"] == ExitCode.INVALID
    assert "model.pretrained: /nowhere/w.pt is not a file" in message["reason"]


def test_pretrained_s3_key_that_is_missing_exits_2(
    isolated: Path, tiny_data: Path, s3_server: S3Server, s3_bucket: str
) -> None:
    uri = f"s3://{s3_bucket}/models/missing.pt"
    job = make_job(
        isolated, tiny_data, epochs=1, model={"architecture": "debug", "pretrained": uri},
        storage={"endpointUrl": s3_server.endpoint_url},
    )  # fmt: skip
    code, message = run_main(isolated, job)
    assert code == ExitCode.INVALID, message
    assert f"model.pretrained: {uri}" in message["reason"] and "no such object" in message["reason"]


def test_pretrained_that_is_not_a_uri_is_rejected_by_the_api(tmp_path: Path, tiny_data: Path) -> None:
    with pytest.raises(Exception, match="pretrained must be an s3:// URI or a file path"):
        make_job(tmp_path, tiny_data, model={"architecture": "debug", "pretrained": "imagenet"})


PLUGIN = """
from torch import nn


def factory(num_classes: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes))
"""


@pytest.fixture
def plugins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder on sys.path with a model module, a broken one, and an installed distribution's metadata
    declaring entry points in group kiln.models (importlib.metadata finds *.dist-info on sys.path)."""
    root = tmp_path / "site"
    root.mkdir()
    (root / "kiln_test_models.py").write_text(PLUGIN)
    (root / "kiln_test_broken.py").write_text("import kiln_test_dependency_nobody_installed\n" + PLUGIN)
    info = root / "kiln_test_models-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: kiln-test-models\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        textwrap.dedent("""
        [kiln.models]
        tiny-plugin = kiln_test_models:factory
        broken-plugin = kiln_test_broken:factory
        """)
    )
    monkeypatch.syspath_prepend(str(root))
    return root


@pytest.mark.parametrize("source", ["kiln_test_models:factory", "tiny-plugin"])
def test_model_plugin_trains(source: str, plugins: Path, isolated: Path, tiny_data: Path) -> None:
    job = make_job(isolated, tiny_data, epochs=1, model={"architecture": "custom", "source": source})
    code, message = run_main(isolated, job)
    assert code == ExitCode.OK, message
    assert message["state"] == "completed"


@pytest.mark.parametrize("source", ["kiln_test_broken:factory", "broken-plugin"])
def test_broken_plugin_names_the_missing_dependency(source: str, plugins: Path, isolated: Path, tiny_data: Path
                                                    ) -> None:  # fmt: skip
    job = make_job(isolated, tiny_data, epochs=1, model={"architecture": "custom", "source": source})
    code, message = run_main(isolated, job)
    assert code == ExitCode.INVALID
    assert "model.source" in message["reason"]
    assert "kiln_test_dependency_nobody_installed" in message["reason"]  # the real cause, not just the plugin


def test_unknown_entry_point_lists_the_installed_ones(plugins: Path, isolated: Path, tiny_data: Path) -> None:
    job = make_job(isolated, tiny_data, epochs=1, model={"architecture": "custom", "source": "tiny-plugn"})
    code, message = run_main(isolated, job)
    assert code == ExitCode.INVALID
    assert "tiny-plugin" in message["reason"]
