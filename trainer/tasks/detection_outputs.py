"""What a person reads after a detection run: the predictions as a COCO results JSON beside the split's ground
truth as COCO JSON (pycocotools recomputes the mAP from the two files alone), and sample pictures with the
ground-truth boxes (left) and the predicted ones with their labels and scores (right).
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from kiln.trainer.tasks.segmentation_overlay import class_colours

# Predictions below this score are left out of the pictures (never out of the JSON or the metrics): detectors
# keep low-scoring boxes because they raise recall in mAP, but a picture full of them says nothing.
SAMPLE_SCORE = 0.3
# Small images are enlarged for the pictures so that labels stay legible.
SAMPLE_MIN_SIDE = 384
TRUTH_COLOUR = (40, 220, 60)


def result_rows(image_id: int, boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray) -> list[dict[str, Any]]:
    """One COCO result per detection: boxes xyxy in original pixels become [x, y, width, height]; categories
    are class index + 1, as in the ground truth's categories."""
    rows = []
    for (x1, y1, x2, y2), score, label in zip(boxes.tolist(), scores.tolist(), labels.tolist(), strict=True):
        rows.append(
            {"image_id": image_id, "category_id": int(label) + 1, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score}
        )
    return rows


def json_bytes(document: Any) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode()


def _draw(
    image: Image.Image, boxes: np.ndarray, texts: Sequence[str], colours: Sequence[tuple[int, int, int]], scale: float
) -> Image.Image:
    panel = image.copy()
    draw = ImageDraw.Draw(panel)
    for (x1, y1, x2, y2), text, colour in zip((boxes * scale).tolist(), texts, colours, strict=True):
        draw.rectangle((x1, y1, x2, y2), outline=colour, width=2)
        left, top, right, bottom = draw.textbbox((x1, y1), text)
        lift = bottom - top + 2
        draw.rectangle((left, top - lift, right + 2, bottom - lift), fill=colour)
        draw.text((x1 + 1, y1 - lift), text, fill=(0, 0, 0))
    return panel


def sample_png(
    image: np.ndarray,
    truth: tuple[np.ndarray, np.ndarray],
    predicted: tuple[np.ndarray, np.ndarray, np.ndarray],
    class_names: Sequence[str],
) -> bytes:
    """Ground truth | prediction (score >= SAMPLE_SCORE) on the original image, enlarged to SAMPLE_MIN_SIDE on
    its shorter side when smaller, as one PNG. Predicted boxes are coloured by class (PASCAL VOC's colours)."""
    height, width = image.shape[:2]
    scale = max(1.0, SAMPLE_MIN_SIDE / min(height, width))
    base = Image.fromarray(image).resize((round(width * scale), round(height * scale)), Image.Resampling.BILINEAR)
    truth_boxes, truth_labels = truth
    truth_texts = [class_names[k] for k in truth_labels.tolist()]
    left = _draw(base, truth_boxes, truth_texts, [TRUTH_COLOUR] * len(truth_labels), scale)
    boxes, scores, labels = predicted
    keep = scores >= SAMPLE_SCORE
    palette = class_colours(len(class_names) + 1)[1:]  # skip black, the background's colour
    colours = [(int(r), int(g), int(b)) for r, g, b in palette[labels[keep]].tolist()]
    texts = [f"{class_names[k]} {s:.2f}" for k, s in zip(labels[keep].tolist(), scores[keep].tolist(), strict=True)]
    right = _draw(base, boxes[keep], texts, colours, scale)
    canvas = Image.new("RGB", (left.width * 2, left.height))
    canvas.paste(left, (0, 0))
    canvas.paste(right, (left.width, 0))
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    return buffer.getvalue()
