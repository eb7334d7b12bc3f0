"""A deterministic synthetic segmentation dataset: circles, squares and triangles on noisy backgrounds.

Nothing is downloaded. Each image holds one to three shapes in random colours on a noisy gradient; its mask
(a single-channel PNG) holds 0 for the background, 1 for circles, 2 for squares and 3 for triangles, so
``model.numClasses`` is 4. The layout is ``segmentation-folder``: ``<split>/images/*.png`` and
``<split>/masks/*.png`` with matching names. The same seed writes the same bytes.

    python -m kiln.trainer.shapes .kiln/data/shapes            # train 1280, val 128, test 128 images of 64 px
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("background", "circle", "square", "triangle")
SPLITS = {"train": 1280, "val": 128, "test": 128}


def draw_sample(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One RGB uint8 image and its HxW uint8 mask of class indices."""
    ramp = np.linspace(0, 1, size)[None, :, None] * rng.uniform(-60, 60, size=3)
    base = rng.uniform(60, 190, size=3) + ramp + rng.normal(0, 18, size=(size, size, 3))
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    mask = Image.new("L", (size, size), 0)
    paint, label = ImageDraw.Draw(image), ImageDraw.Draw(mask)
    for _ in range(int(rng.integers(1, 4))):
        kind = int(rng.integers(1, len(CLASSES)))
        radius = rng.uniform(0.14, 0.28) * size
        cx, cy = rng.uniform(radius, size - radius, size=2)
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        if kind == 1:
            shape: list[tuple[float, float]] = [(cx - radius, cy - radius), (cx + radius, cy + radius)]
            paint.ellipse(shape, fill=colour)
            label.ellipse(shape, fill=kind)
            continue
        if kind == 2:
            angle = rng.uniform(0, np.pi / 2)
            corners = [angle + k * np.pi / 2 + np.pi / 4 for k in range(4)]
        else:
            angle = rng.uniform(0, 2 * np.pi)
            corners = [angle + k * 2 * np.pi / 3 for k in range(3)]
        shape = [(cx + radius * np.cos(a), cy + radius * np.sin(a)) for a in corners]
        paint.polygon(shape, fill=colour)
        label.polygon(shape, fill=kind)
    pixels = np.asarray(image).astype(np.float64) + rng.normal(0, 8, size=(size, size, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8), np.asarray(mask)


def write_shapes(dest: Path, *, splits: dict[str, int] | None = None, size: int = 64, seed: int = 0) -> Path:
    """Write dest/<split>/{images,masks}/NNNN.png for each split. Idempotent: a finished dataset is kept."""
    splits = splits or SPLITS
    marker = dest / ".complete"
    if marker.exists() and marker.read_text() == repr((splits, size, seed)):
        return dest
    shutil.rmtree(dest, ignore_errors=True)
    for offset, (split, count) in enumerate(sorted(splits.items())):
        rng = np.random.default_rng([seed, offset])
        (dest / split / "images").mkdir(parents=True)
        (dest / split / "masks").mkdir(parents=True)
        for index in range(count):
            image, mask = draw_sample(rng, size)
            Image.fromarray(image).save(dest / split / "images" / f"{index:04d}.png")
            Image.fromarray(mask).save(dest / split / "masks" / f"{index:04d}.png")
    marker.write_text(repr((splits, size, seed)))
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write the synthetic shapes segmentation dataset.")
    parser.add_argument("dest", type=Path)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=SPLITS["train"])
    parser.add_argument("--val", type=int, default=SPLITS["val"])
    parser.add_argument("--test", type=int, default=SPLITS["test"])
    args = parser.parse_args(argv)
    counts = {"train": args.train, "val": args.val, "test": args.test}
    path = write_shapes(args.dest, splits=counts, size=args.size, seed=args.seed)
    print(f"shapes: {sum(counts.values())} images ({', '.join(f'{k} {v}' for k, v in counts.items())}) in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
