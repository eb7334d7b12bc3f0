"""Fixtures for the trainer tests."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from trainer_testkit import REPO, trainer_command, trainer_env, write_images


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train (3 x 16 images), val (3 x 5) and test (3 x 4) imagefolder splits of 16 px images."""
    root = tmp_path_factory.mktemp("tiny-data")
    write_images(root / "train", 16, seed=1)
    write_images(root / "val", 5, seed=2)
    write_images(root / "test", 4, seed=3)
    return root


@pytest.fixture
def start_trainer() -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """Start a trainer in its own process group; any still running at teardown is killed."""
    started: list[subprocess.Popen[str]] = []

    def start(spec: Path, env: dict[str, str], procs: int | None = None, **kwargs: Any) -> subprocess.Popen[str]:
        process = subprocess.Popen(
            kwargs.pop("command", None) or trainer_command(spec, procs), env=env, cwd=kwargs.pop("cwd", REPO),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, **kwargs,
        )  # fmt: skip
        started.append(process)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """tmp_path for an in-process ``main()``, which installs signal handlers and reads the environment:
    keep both from leaking into other tests."""
    for key, value in trainer_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    yield tmp_path
    for sig, handler in handlers.items():
        signal.signal(sig, handler)
