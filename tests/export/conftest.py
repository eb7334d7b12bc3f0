"""Fixtures for the exporter tests: a tiny classification dataset and checkpoint, shared by the module."""

from __future__ import annotations

from pathlib import Path

import pytest

from kiln.api.resolve import ResolvedTrainingJob
from tests.export.export_testkit import classification_job, save_checkpoint
from tests.trainer.trainer_testkit import write_images

CLASSES = ("class0", "class1", "class2")


@pytest.fixture(scope="session")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """imagefolder train (3 x 4) and val (3 x 4) splits of 16 px images, classes class0..class2."""
    root = tmp_path_factory.mktemp("export-data")
    write_images(root / "train", 4, seed=1)
    write_images(root / "val", 4, seed=2)
    return root


@pytest.fixture(scope="session")
def classifier(tmp_path_factory: pytest.TempPathFactory, images: Path) -> tuple[ResolvedTrainingJob, str]:
    """The debug classifier's job and a checkpoint of it (with EMA weights), as the trainer writes them."""
    job = classification_job(tmp_path_factory.mktemp("clf"), images)
    return job, save_checkpoint(job, CLASSES)
