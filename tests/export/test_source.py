"""Reading a checkpoint back into its network: the wrappers training adds to parameter names are removed."""

from __future__ import annotations

from pathlib import Path

import torch

from kiln.api.resolve import ResolvedTrainingJob
from kiln.trainer.export.source import load_source


def test_ddp_and_torch_compile_prefixes_are_stripped_from_the_saved_weights(
    tmp_path: Path, classifier: tuple[ResolvedTrainingJob, str]
) -> None:
    state = torch.load(classifier[1], weights_only=False)
    model = state["model"]
    # DDP around torch.compile's wrapper, as a compiled DDP run's state_dict names them; no EMA in this run.
    state.update(model={f"module._orig_mod.{key}": value for key, value in model.items()}, ema=None)
    torch.save(state, tmp_path / "state.pt")
    source = load_source(str(tmp_path / "state.pt"), None)
    assert source.weights == "model"
    loaded = source.network.state_dict()
    assert loaded.keys() == model.keys() and all(torch.equal(loaded[key], model[key]) for key in model)
