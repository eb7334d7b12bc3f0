"""``kiln export``: the manifest run locally through the exporter, a table of artifacts, and its exit codes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

import kiln.cli
from kiln.api.contract import ExitCode
from kiln.api.resolve import ResolvedTrainingJob
from kiln.cli import app
from kiln.console import LazyConsole

pytestmark = pytest.mark.slow


def manifest(path: Path, **spec: Any) -> Path:
    document = {"apiVersion": "kiln.dev/v1alpha1", "kind": "ExportJob", "metadata": {"name": "tiny"}, "spec": spec}
    path.write_text(yaml.safe_dump(document))
    return path


def test_kiln_export_prints_the_artifacts_with_their_figures(
    tmp_path: Path, classifier: tuple[ResolvedTrainingJob, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    # One table row per artifact: the CLI's console took its width when kiln.cli was first imported (under
    # pytest-xdist that is a worker's 80 columns), so this test gives it a wide one.
    monkeypatch.setattr(kiln.cli, "out", LazyConsole(width=160))
    checkpoints = str(Path(classifier[1]).parents[1])  # the checkpoint root: best.json picks the checkpoint
    spec = {"formats": ["pt2"], "output": {"uri": str(tmp_path / "out")}}
    spec["benchmark"] = {"batchSizes": [1, 4], "iterations": 5}
    file = manifest(tmp_path / "export.yaml", source={"trainingJob": "clf"}, **spec)
    result = CliRunner().invoke(app, ["export", str(file), "--checkpoint", checkpoints])
    assert result.exit_code == ExitCode.OK, result.output
    rows = {line.split("│")[1].strip(): line for line in result.output.splitlines() if line.count("│") > 6}
    assert set(rows) == {"pt2", "eager torch"}, result.output
    cells = [cell.strip() for cell in rows["pt2"].split("│")[1:-1]]
    assert cells[0] == "pt2" and cells[1].endswith("KiB") and cells[2] == "yes" and cells[6] == "yes"
    assert len(cells[4].split(" / ")) == 2 and cells[5].count("x") == 2  # p50 and speedup at batch 1 and 4
    assert "p50 ms (batch 1/4)" in result.output and "ema weights, verified on validation inputs" in result.output
    assert (tmp_path / "out" / "model.pt2").exists() and (tmp_path / "out" / "export-report.json").exists()
    assert (tmp_path / ".kiln" / "exports" / "local-tiny" / "export.log").exists()


def test_a_missing_checkpoint_is_one_line_and_exit_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    file = manifest(tmp_path / "export.yaml", source={"checkpointUri": str(tmp_path / "nope" / "state.pt")})
    result = CliRunner().invoke(app, ["export", str(file)])
    assert result.exit_code == ExitCode.INVALID
    assert result.output.strip().splitlines() == [
        f"error {file}: spec.source.checkpointUri: checkpoint {tmp_path / 'nope' / 'state.pt'} does not exist"
    ]
    no_run = CliRunner().invoke(
        app, ["export", str(manifest(tmp_path / "tj.yaml", source={"trainingJob": "never-ran"}))]
    )
    assert no_run.exit_code == ExitCode.INVALID and "no checkpoints from `kiln run`" in no_run.output
