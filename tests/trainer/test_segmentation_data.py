"""Reading segmentation masks: colour masks through data.palette, and palette-mode PNGs as stored indices."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from trainer_testkit import make_job

from kiln.api.resolve import ResolvedTrainingJob
from kiln.trainer.augment import eval_pipeline
from kiln.trainer.errors import InvalidInput
from kiln.trainer.tasks.segmentation import SegmentationTask
from kiln.trainer.tasks.segmentation_data import MaskedImages

SIZE, IGNORE = 16, 255
COLOURS = [[0, 0, 0], [220, 30, 30], [30, 30, 220]]  # classes 0, 1, 2
IGNORE_COLOUR = [255, 255, 255]
# PASCAL VOC's colour map for 0, 1, 2 and its border colour for 255: what a VOC mask's own PNG palette shows.
VOC = {0: (0, 0, 0), 1: (128, 0, 0), 2: (0, 128, 0), 255: (224, 224, 192)}


def index_masks(count: int, seed: int = 0) -> list[np.ndarray]:
    """Masks of classes 0..2 in blocks, with some ignored pixels: what the colour masks must read back as."""
    rng = np.random.default_rng(seed)
    masks = []
    for _ in range(count):
        blocks = rng.integers(0, 3, size=(4, 4))
        mask = np.kron(blocks, np.ones((SIZE // 4, SIZE // 4), dtype=np.int64)).astype(np.uint8)
        mask[rng.random(mask.shape) < 0.05] = IGNORE
        masks.append(mask)
    return masks


def write_split(root: Path, masks: list[np.ndarray], save: Any) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir(parents=True)
    for index, mask in enumerate(masks):
        Image.fromarray(np.full((SIZE, SIZE, 3), 90, np.uint8)).save(root / "images" / f"{index}.png")
        save(mask, root / "masks" / f"{index}.png")
    return root


def save_rgb(mask: np.ndarray, path: Path) -> None:
    lookup = dict(enumerate(COLOURS)) | {IGNORE: IGNORE_COLOUR}
    Image.fromarray(np.array([[lookup[int(v)] for v in row] for row in mask], dtype=np.uint8)).save(path)


def save_voc(mask: np.ndarray, path: Path) -> None:
    """A palette-mode PNG as VOC ships them: the pixels store indices, the PNG palette colours them."""
    image = Image.fromarray(mask, mode="P")
    palette = [0] * 768
    for index, colour in VOC.items():
        palette[3 * index : 3 * index + 3] = colour
    image.putpalette(palette)
    image.save(path)


def seg_job(tmp_path: Path, dataset: Path, **data: Any) -> ResolvedTrainingJob:
    spec = {
        "task": "segmentation",
        "model": {"architecture": "unet", "encoder": "tu-tf_mobilenetv3_small_minimal_100", "numClasses": 3},
        "data": {"train": {"format": "segmentation-folder"}, "val": {"format": "segmentation-folder"}, **data},
    }
    return make_job(tmp_path, dataset, **spec)


def train_split(job: ResolvedTrainingJob) -> MaskedImages:
    roots = {"train": Path(job.spec.data.train.uri), "val": Path(job.spec.data.val.uri)}  # type: ignore[union-attr]
    split = SegmentationTask().load_data(job, roots).splits["train"]
    assert isinstance(split, MaskedImages)
    return split


@pytest.fixture
def colour_masks(tmp_path: Path) -> tuple[Path, list[np.ndarray]]:
    masks = index_masks(4)
    write_split(tmp_path / "data" / "train", masks, save_rgb)
    write_split(tmp_path / "data" / "val", masks[:2], save_rgb)
    return tmp_path / "data", masks


def test_palette_maps_colours_to_classes_and_the_ignore_colour_to_ignore_index(
    tmp_path: Path, colour_masks: tuple[Path, list[np.ndarray]]
) -> None:
    dataset, masks = colour_masks
    split = train_split(seg_job(tmp_path, dataset, palette=COLOURS, ignoreColor=IGNORE_COLOUR))
    for index, expected in enumerate(masks):
        assert np.array_equal(split.read_mask(index), expected)
    item = split.dataset(eval_pipeline(SIZE, (0.5,) * 3, (0.5,) * 3))[1]  # what training sees, same size
    assert np.array_equal(item["mask"].numpy(), masks[1])


def test_a_colour_outside_the_palette_is_one_line_naming_file_colour_and_pixel(
    tmp_path: Path, colour_masks: tuple[Path, list[np.ndarray]]
) -> None:
    dataset, _ = colour_masks
    path = dataset / "train" / "masks" / "2.png"
    pixels = np.asarray(Image.open(path)).copy()
    pixels[3, 5] = [1, 2, 3]  # row 3, column 5
    Image.fromarray(pixels).save(path)
    split = train_split(seg_job(tmp_path, dataset, palette=COLOURS, ignoreColor=IGNORE_COLOUR))
    with pytest.raises(InvalidInput) as error:
        split.read_mask(2)
    message = str(error.value)
    assert str(path) in message and "[1, 2, 3]" in message and "(x=5, y=3)" in message and "\n" not in message
    # Without ignoreColor, white is no class either: the first white pixel is the one reported.
    split = train_split(seg_job(tmp_path, dataset, palette=COLOURS))
    with pytest.raises(InvalidInput, match=r"has colour \[255, 255, 255\] at pixel .* not in data\.palette \("):
        split.read_mask(0)


def test_index_masks_keep_their_rules_with_no_palette(
    tmp_path: Path, colour_masks: tuple[Path, list[np.ndarray]]
) -> None:
    dataset, _ = colour_masks
    with pytest.raises(InvalidInput, match=r"is RGB: a mask must be a single-channel image .* set data\.palette"):
        train_split(seg_job(tmp_path, dataset)).read_mask(0)


def test_palette_mode_pngs_are_read_as_their_stored_indices(tmp_path: Path) -> None:
    masks = index_masks(3, seed=1)
    write_split(tmp_path / "voc" / "train", masks, save_voc)
    write_split(tmp_path / "voc" / "val", masks[:1], save_voc)
    assert Image.open(tmp_path / "voc" / "train" / "masks" / "0.png").mode == "P"
    split = train_split(seg_job(tmp_path, tmp_path / "voc"))
    for index, expected in enumerate(masks):
        assert np.array_equal(split.read_mask(index), expected)
    # With a palette of VOC's colours the same files read by colour, to the same classes.
    voc = {"palette": [list(VOC[k]) for k in range(3)], "ignoreColor": list(VOC[IGNORE])}
    split = train_split(seg_job(tmp_path, tmp_path / "voc", **voc))
    for index, expected in enumerate(masks):
        assert np.array_equal(split.read_mask(index), expected)


def test_a_binary_palette_reads_white_on_black_greyscale_masks(tmp_path: Path) -> None:
    masks = [(mask == 1).astype(np.uint8) for mask in index_masks(2, seed=2)]
    write_split(tmp_path / "bw" / "train", masks, lambda mask, path: Image.fromarray(mask * 255).save(path))
    write_split(tmp_path / "bw" / "val", masks[:1], lambda mask, path: Image.fromarray(mask * 255).save(path))
    job = make_job(
        tmp_path,
        tmp_path / "bw",
        task="segmentation",
        model={"architecture": "unet", "encoder": "tu-tf_mobilenetv3_small_minimal_100", "numClasses": 1},
        data={
            "train": {"format": "segmentation-folder"},
            "val": {"format": "segmentation-folder"},
            "palette": [[0, 0, 0], [255, 255, 255]],
        },
    )
    split = train_split(job)
    assert [np.array_equal(split.read_mask(i), mask) for i, mask in enumerate(masks)] == [True, True]
