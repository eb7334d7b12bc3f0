"""The format registry's own promises, without a checkpoint: TorchScript still works but says it is deprecated."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch import nn

from kiln.trainer.export.formats import FORMATS, Graph


def test_torchscript_is_exported_and_loaded_with_a_deprecation_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    torch.manual_seed(0)
    network = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    info = FORMATS.get("torchscript")
    with caplog.at_level(logging.WARNING, logger="kiln.trainer.export.formats"):
        exported = info.export(Graph(network, torch.randn(2, 3, 8, 8), "logits", 18), tmp_path / info.filename)
    assert exported.exporter is None and exported.fallback_reason is None
    assert [r.getMessage() for r in caplog.records] == [
        "torchscript is deprecated upstream in favour of torch.export: prefer the pt2 format"
    ]
    images = torch.randn(5, 3, 8, 8)  # not the traced batch of 2
    with torch.no_grad():
        torch.testing.assert_close(info.load(tmp_path / info.filename, torch.device("cpu"))(images), network(images))
