"""Precision and the CPU smoke tests for memory format and torch.compile, in one process."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
import torch
from inprocess import CPU, build_trainer, run_main
from trainer_testkit import make_job

from kiln.api.contract import ExitCode
from kiln.trainer.distributed import pick_precision
from kiln.trainer.errors import InvalidInput

pytestmark = pytest.mark.timeout(90)


def test_auto_is_fp32_on_cpu(tmp_path: Path, tiny_data: Path) -> None:
    trainer = build_trainer(tmp_path, tiny_data)  # precision defaults to auto
    assert trainer.spec.precision == "auto"
    assert trainer.c.accelerator.precision.name == "fp32"
    assert not trainer.c.accelerator.scaler.is_enabled()


def test_bf16_trains_on_cpu_with_autocast(isolated: Path, tiny_data: Path) -> None:
    """bf16 is allowed on CPU on purpose (CPU autocast supports it, no GradScaler needed); fp16 is not."""
    job = make_job(isolated, tiny_data, epochs=1, precision="bf16")
    trainer = build_trainer(isolated / "probe", tiny_data, precision="bf16")
    assert trainer.c.accelerator.precision.dtype == torch.bfloat16
    with trainer.c.accelerator.autocast():
        logits = trainer.c.model(torch.zeros(2, 3, 16, 16))
    assert logits.dtype == torch.bfloat16  # autocast is really on
    code, message = run_main(isolated, job)
    assert code == ExitCode.OK, message
    assert math.isfinite(message["progress"]["metrics"]["train/loss"])


def test_fp16_on_cpu_is_invalid_input(isolated: Path, tiny_data: Path) -> None:
    with pytest.raises(InvalidInput, match="fp16 needs a CUDA device"):
        pick_precision("fp16", CPU.device)
    code, message = run_main(isolated, make_job(isolated, tiny_data, epochs=1, precision="fp16"))
    assert code == ExitCode.INVALID and "precision fp16 needs a CUDA device" in message["reason"]


def test_channels_last_trains(isolated: Path, tiny_data: Path) -> None:
    job = make_job(isolated, tiny_data, epochs=1, channelsLast=True)
    trainer = build_trainer(isolated / "probe", tiny_data, channelsLast=True)
    weight = trainer.c.model.features[0][0].weight
    assert weight.is_contiguous(memory_format=torch.channels_last)
    code, message = run_main(isolated, job)
    assert code == ExitCode.OK, message


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_compile_trains_and_checkpoints_plain_weights(isolated: Path, tiny_data: Path) -> None:
    """torch.compile on CPU (inductor, needs a C++ compiler): a smoke test, marked slow for its compile time."""
    job = make_job(isolated, tiny_data, epochs=1, compile=True)
    started = time.monotonic()
    code, message = run_main(isolated, job)
    assert code == ExitCode.OK, message
    latest = message["checkpoints"]["latest"]
    state = torch.load(Path(latest.removeprefix("file://")), map_location="cpu", weights_only=False)
    assert not any(key.startswith("_orig_mod.") for key in state["model"])  # loadable without compile
    print(f"compile run: {time.monotonic() - started:.0f}s")
