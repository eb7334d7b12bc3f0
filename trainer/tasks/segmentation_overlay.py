"""Sample overlays for a person to look at: image | ground truth | prediction, side by side, one PNG per image.

Masks are drawn with a fixed colour per class (PASCAL VOC's colour map: class 0 black, 1 dark red, 2 green,
3 olive, ...), the same in every run and every panel, so a colour means one class wherever it appears. Ignored
pixels are white, a colour no class index below 2**21 gets.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

IGNORE_COLOUR = (255, 255, 255)


def class_colours(count: int) -> np.ndarray:
    """``count`` x 3 uint8 RGB colours, PASCAL VOC's map: the bits of each class index are dealt out to the red,
    green and blue channels from the most significant bit down, so every index gets its own colour."""
    index = np.arange(count, dtype=np.int64)
    colours = np.zeros((count, 3), dtype=np.int64)
    for shift in range(7, -1, -1):
        for channel in range(3):
            colours[:, channel] |= ((index >> channel) & 1) << shift
        index >>= 3
    return colours.astype(np.uint8)


def colour_mask(mask: np.ndarray, colours: np.ndarray, ignore_index: int) -> np.ndarray:
    """An HxW mask of class indices (and ``ignore_index``) as an HxWx3 RGB image."""
    ignored = mask == ignore_index
    out = colours[np.where(ignored, 0, mask).astype(np.int64)]
    out[ignored] = IGNORE_COLOUR
    return out


def overlay_png(
    image: np.ndarray, truth: np.ndarray, predicted: np.ndarray, colours: np.ndarray, ignore_index: int
) -> bytes:
    """The three panels of one image, all at its original size (H x 3W), encoded as a PNG."""
    panels = [image, colour_mask(truth, colours, ignore_index), colour_mask(predicted, colours, ignore_index)]
    buffer = io.BytesIO()
    Image.fromarray(np.concatenate(panels, axis=1)).save(buffer, format="PNG")
    return buffer.getvalue()
