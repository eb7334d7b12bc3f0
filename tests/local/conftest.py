"""Fixtures for the ``kiln run`` tests."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from local_testkit import cli_env, kill_everything, kiln_run_command, write_images


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train (3 x 16 images) and val (3 x 5) imagefolder splits of 16 px images."""
    root = tmp_path_factory.mktemp("tiny-data")
    write_images(root / "train", 16, seed=1)
    write_images(root / "val", 5, seed=2)
    return root


@pytest.fixture
def start_kiln_run(tmp_path: Path) -> Iterator[Callable[[Path], subprocess.Popen[str]]]:
    """Start ``kiln run MANIFEST`` in tmp_path, stdout and stderr merged; whatever still runs at teardown dies."""
    started: list[subprocess.Popen[str]] = []

    def start(manifest: Path) -> subprocess.Popen[str]:
        process = subprocess.Popen(
            kiln_run_command(manifest), cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )  # fmt: skip
        started.append(process)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            kill_everything(process)
