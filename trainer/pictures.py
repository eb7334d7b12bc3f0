"""Pictures of a run for a person to look at, written next to ``metrics.jsonl``: ``curves.png`` (the losses and
the validation metric per epoch, restarts marked) and, for classification, ``confusion.png`` (the final
evaluation's confusion matrix, normalized per true class, with class names).

Rendered with matplotlib's Agg canvas on a ``Figure`` of its own, never pyplot: no global figure state, no
display, safe beside the training threads. Called at the end of a run (and of the final evaluation), never
per step.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np

from kiln.trainer.history import RESTARTED_AT

CURVES, CONFUSION = "curves.png", "confusion.png"
# Beyond this many classes the cells are too small for numbers and the axes for names.
ANNOTATED_CLASSES, NAMED_CLASSES = 12, 40
DPI = 100


def normalized_confusion(confusion: Sequence[Sequence[float]]) -> np.ndarray:
    """Rows (true classes) scaled to sum to 1: the share of each class predicted as each other class. A class
    with no true examples keeps a row of zeros rather than a row of NaN."""
    matrix = np.asarray(confusion, dtype=np.float64)
    totals = matrix.sum(axis=1, keepdims=True)
    return np.divide(matrix, totals, out=np.zeros_like(matrix), where=totals > 0)


def curve_series(records: Sequence[dict[str, Any]], metric: str) -> dict[str, list[tuple[float, float]]]:
    """(epoch, value) per plotted series, from metrics.jsonl's records: train/loss, val/loss and val/<metric>."""
    series: dict[str, list[tuple[float, float]]] = {}
    for key in ("train/loss", "val/loss", f"val/{metric}"):
        points = [(float(r["epoch"]), float(r[key])) for r in records if isinstance(r.get(key), int | float)]
        if points:
            series[key] = points
    return series


def restarts(records: Sequence[dict[str, Any]]) -> list[float]:
    """The (fractional) epochs at which a restarted or resumed process took over."""
    return [float(r[RESTARTED_AT]) for r in records if isinstance(r.get(RESTARTED_AT), int | float)]


def curves_png(records: Sequence[dict[str, Any]], metric: str, title: str) -> bytes:
    """Two panels over epochs: the losses, and the validation metric; a dashed line at every restart."""
    from matplotlib.ticker import MaxNLocator

    series = curve_series(records, metric)
    figure, canvas = _figure(10, 4)
    loss_axes, metric_axes = figure.subplots(1, 2)
    for key in ("train/loss", "val/loss"):
        if key in series:
            loss_axes.plot(*zip(*series[key], strict=True), marker="o", markersize=3, label=key)
    watched = f"val/{metric}"
    if watched in series:
        metric_axes.plot(*zip(*series[watched], strict=True), marker="o", markersize=3, color="tab:green",
                         label=watched)  # fmt: skip
    for axes, name in ((loss_axes, "loss"), (metric_axes, watched)):
        for number, epoch in enumerate(restarts(records)):
            axes.axvline(epoch, color="tab:red", linestyle="--", linewidth=1, label="restart" if number == 0 else None)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_xlabel("epoch")
        axes.set_ylabel(name)
        axes.grid(alpha=0.3)
        if axes.get_legend_handles_labels()[0]:
            axes.legend(fontsize="small")
    figure.suptitle(title)
    return _png(figure, canvas)


def confusion_png(normalized: np.ndarray, class_names: Sequence[str], title: str) -> bytes:
    """A heat map of ``normalized`` (rows: true class, columns: predicted), named axes for up to NAMED_CLASSES
    classes and each cell's share written in for up to ANNOTATED_CLASSES."""
    count = len(normalized)
    side = min(4 + 0.35 * count, 24)
    figure, canvas = _figure(side + 1.5, side)
    axes = figure.subplots()
    image = axes.imshow(normalized, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04)
    if count <= NAMED_CLASSES:
        ticks = np.arange(count)
        axes.set_xticks(ticks, labels=list(class_names), rotation=45, ha="right", fontsize="small")
        axes.set_yticks(ticks, labels=list(class_names), fontsize="small")
    if count <= ANNOTATED_CLASSES:
        for (row, column), value in np.ndenumerate(normalized):
            axes.text(column, row, f"{value:.2f}", ha="center", va="center", fontsize="x-small",
                      color="white" if value > 0.5 else "black")  # fmt: skip
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(title)
    return _png(figure, canvas)


def preload() -> None:
    """Import matplotlib ahead of the end of the run (on the tracking worker, while training goes on): the first
    import costs more than drawing both pictures."""
    _figure(1, 1)


def _figure(width: float, height: float) -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    return figure, FigureCanvasAgg(figure)


def _png(figure: Any, canvas: Any) -> bytes:
    buffer = io.BytesIO()
    canvas.print_png(buffer)
    figure.clear()
    return buffer.getvalue()
