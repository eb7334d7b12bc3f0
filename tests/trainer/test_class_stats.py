"""class-stats.json and loss.classWeights auto: counts against numpy, weights against scikit-learn, read back
on resume instead of counted again."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from inprocess import CPU
from PIL import Image
from sklearn.utils.class_weight import compute_class_weight
from trainer_testkit import make_job, write_images

from kiln.api.resolve import ResolvedTrainingJob
from kiln.trainer.class_stats import STATS_KEY, balanced_weights
from kiln.trainer.shapes import write_shapes
from kiln.trainer.tasks.segmentation_data import MaskCounts
from kiln.trainer.trainer import Trainer

SEGMENTATION = {
    "task": "segmentation",
    "model": {"architecture": "unet", "encoder": "tu-tf_mobilenetv3_small_minimal_100", "numClasses": 4},
    "data": {"train": {"format": "segmentation-folder"}, "val": {"format": "segmentation-folder"}, "imageSize": 32},
}


@pytest.mark.parametrize("seed", range(4))
def test_balanced_weights_are_scikit_learns(seed: int) -> None:
    rng = np.random.default_rng(seed)
    skewed = rng.choice(5, size=400, p=rng.dirichlet(np.ones(5) * 0.5))
    labels = np.concatenate([np.arange(5), skewed])  # every class occurs: scikit-learn insists
    expected = compute_class_weight("balanced", classes=np.arange(5), y=labels)
    assert balanced_weights(np.bincount(labels, minlength=5).tolist()) == pytest.approx(expected)


def test_a_class_that_never_occurs_gets_weight_1_and_the_others_scikit_learns() -> None:
    labels = np.array([0, 0, 0, 0, 0, 0, 2, 2, 3])
    present = np.unique(labels)
    weights = balanced_weights(np.bincount(labels, minlength=5).tolist())
    assert weights[1] == weights[4] == 1.0
    assert [weights[k] for k in present] == pytest.approx(compute_class_weight("balanced", classes=present, y=labels))


# -- classification: samples per class, from the listing -------------------------------------------------------


@pytest.fixture
def imbalanced(tmp_path: Path) -> Path:
    """3 classes of 12, 5 and 2 training images: balanced weights far from 1."""
    root = tmp_path / "imbalanced"
    write_images(root / "train", 12, seed=1)
    write_images(root / "val", 2, seed=2)
    for folder, keep in (("class1", 5), ("class2", 2)):
        for path in sorted((root / "train" / folder).iterdir())[keep:]:
            path.unlink()
    return root


def test_classification_counts_samples_and_auto_weighs_cross_entropy(tmp_path: Path, imbalanced: Path) -> None:
    trainer = Trainer(make_job(tmp_path, imbalanced, loss={"classWeights": "auto"}), CPU)
    labels = np.concatenate([[k] * len(list((imbalanced / "train" / f"class{k}").iterdir())) for k in range(3)])
    stats = json.loads((Path(trainer.job.run_uri) / STATS_KEY).read_text())
    assert stats["unit"] == "samples" and stats["images"] == len(labels) == 19
    assert [c["samples"] for c in stats["classes"]] == np.bincount(labels).tolist()
    assert [c["name"] for c in stats["classes"]] == ["class0", "class1", "class2"]
    weights = torch.tensor(compute_class_weight("balanced", classes=np.arange(3), y=labels), dtype=torch.float32)
    logits, target = torch.randn(6, 3, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 2, 1, 0])
    loss = trainer.c.objective.loss(logits, {"target": target})
    assert loss == pytest.approx(F.cross_entropy(logits, target, weight=weights).item(), rel=1e-6)
    assert loss != pytest.approx(F.cross_entropy(logits, target).item(), rel=1e-3)  # the weights do change it


# -- segmentation: pixels per class, from the masks ------------------------------------------------------------


@pytest.fixture
def shapes_with_ignored_pixels(tmp_path: Path) -> Path:
    """8 train and 2 val shapes images (classes 0..3); two train masks with a band of ignored pixels."""
    root = write_shapes(tmp_path / "shapes", splits={"train": 8, "val": 2}, size=32)
    for name in ("0001.png", "0006.png"):
        path = root / "train" / "masks" / name
        mask = np.asarray(Image.open(path)).copy()
        mask[:, :3] = 255
        Image.fromarray(mask).save(path)
    return root


def train_masks(dataset: Path) -> list[np.ndarray]:
    """Every training mask as numpy reads it, independently of the trainer's reader."""
    return [np.asarray(Image.open(path)) for path in sorted((dataset / "train" / "masks").iterdir())]


def expected_pixel_stats(masks: list[np.ndarray], classes: int) -> dict[str, Any]:
    pixels = np.concatenate([mask.ravel() for mask in masks])
    return {
        "pixels": np.bincount(pixels[pixels != 255], minlength=classes).tolist(),
        "images": [sum(bool((mask == k).any()) for mask in masks) for k in range(classes)],
        "ignoredPixels": int((pixels == 255).sum()),
    }


def seg_job(tmp_path: Path, dataset: Path, **overrides: Any) -> ResolvedTrainingJob:
    return make_job(tmp_path, dataset, **{**SEGMENTATION, **overrides})


def test_segmentation_counts_equal_numpy_and_auto_weighs_cross_entropy(
    tmp_path: Path, shapes_with_ignored_pixels: Path
) -> None:
    dataset = shapes_with_ignored_pixels
    trainer = Trainer(seg_job(tmp_path, dataset, loss={"name": "cross_entropy", "classWeights": "auto"}), CPU)
    stats = json.loads((Path(trainer.job.run_uri) / STATS_KEY).read_text())
    masks = train_masks(dataset)
    expected = expected_pixel_stats(masks, 4)
    assert stats["unit"] == "pixels" and stats["images"] == 8 and stats["ignoredPixels"] == expected["ignoredPixels"]
    assert [c["pixels"] for c in stats["classes"]] == expected["pixels"]
    assert [c["images"] for c in stats["classes"]] == expected["images"]
    assert sum(c["frequency"] for c in stats["classes"]) == pytest.approx(1.0)

    labelled = np.concatenate([mask[mask != 255] for mask in masks])
    weights = compute_class_weight("balanced", classes=np.arange(4), y=labelled)
    generator = torch.Generator().manual_seed(0)
    logits, mask = torch.randn(2, 4, 8, 8, generator=generator), torch.randint(0, 4, (2, 8, 8), generator=generator)
    mask[:, 0] = 255
    expected_loss = F.cross_entropy(logits, mask, weight=torch.tensor(weights, dtype=torch.float32), ignore_index=255)
    assert trainer.c.objective.loss(logits, {"mask": mask}) == pytest.approx(expected_loss.item(), rel=1e-5)


def test_the_stats_file_is_read_back_on_resume_not_counted_again(
    tmp_path: Path, shapes_with_ignored_pixels: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = seg_job(tmp_path, shapes_with_ignored_pixels, loss={"classWeights": "auto"})
    first = Trainer(job, CPU)
    written = (Path(job.run_uri) / STATS_KEY).read_text()

    def no_reading(self: MaskCounts, index: int) -> Any:
        raise AssertionError("a mask was read again")

    monkeypatch.setattr(MaskCounts, "__getitem__", no_reading)
    again = Trainer(job, CPU)
    assert again.c.data.class_stats == first.c.data.class_stats
    assert (Path(job.run_uri) / STATS_KEY).read_text() == written


def test_stats_of_other_data_are_counted_again(tmp_path: Path, shapes_with_ignored_pixels: Path) -> None:
    job = seg_job(tmp_path, shapes_with_ignored_pixels)
    Trainer(job, CPU)
    path = Path(job.run_uri) / STATS_KEY
    stale = json.loads(path.read_text())
    path.write_text(json.dumps({**stale, "images": 99, "classes": stale["classes"][:2]}))
    Trainer(job, CPU)
    assert json.loads(path.read_text()) == stale


def test_a_palette_run_counts_the_ignore_colour_as_ignored(tmp_path: Path, shapes_with_ignored_pixels: Path) -> None:
    colours = [[0, 0, 0], [200, 0, 0], [0, 200, 0], [0, 0, 200]]
    dataset = tmp_path / "colour"
    shutil.copytree(shapes_with_ignored_pixels, dataset)
    lookup = np.zeros((256, 3), np.uint8)
    lookup[:4], lookup[255] = colours, [255, 255, 255]
    for path in (dataset / "train" / "masks").iterdir():
        Image.fromarray(lookup[np.asarray(Image.open(path))]).save(path)
    for path in (dataset / "val" / "masks").iterdir():
        Image.fromarray(lookup[np.asarray(Image.open(path))]).save(path)
    data = {**SEGMENTATION["data"], "palette": colours, "ignoreColor": [255, 255, 255]}
    trainer = Trainer(seg_job(tmp_path, dataset, data=data), CPU)
    stats = json.loads((Path(trainer.job.run_uri) / STATS_KEY).read_text())
    expected = expected_pixel_stats(train_masks(shapes_with_ignored_pixels), 4)
    assert [c["pixels"] for c in stats["classes"]] == expected["pixels"]
    assert stats["ignoredPixels"] == expected["ignoredPixels"] > 0
