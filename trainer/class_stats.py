"""The training split's class statistics, written to the run's output as ``class-stats.json``, and the class
weights ``loss.classWeights: auto`` derives from them.

Classification counts samples per class, from the listing; detection counts boxes per class and the images
holding each class, from the listing too. Segmentation counts pixels per class, the images
holding each class, and the pixels of data.ignoreIndex (apart from every class), from the masks: each rank
reads its shard and the sums are all-reduced, so 8 ranks do not each read every mask. This happens once per
run: a restart finds the file and reads it back instead of counting again.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from kiln.api.resolve import ResolvedTrainingJob
from kiln.storage import ObjectNotFoundError, Store, open_store
from kiln.trainer.distributed import World, broadcast_object
from kiln.trainer.errors import InvalidInput

log = logging.getLogger(__name__)

STATS_KEY = "class-stats.json"


@dataclass(frozen=True)
class ClassStats:
    unit: Literal["samples", "pixels", "boxes"]
    """What ``counts`` counts, and the key each class's count has in the file."""
    classes: tuple[str, ...]
    counts: tuple[int, ...]
    images: tuple[int, ...]
    """Training images holding each class (for classification, the same as ``counts``)."""
    split_size: int
    """Images in the training split."""
    ignored: int = 0
    """Pixels of data.ignoreIndex, in no class's count."""

    def to_json(self) -> dict[str, Any]:
        total = sum(self.counts)
        classes = []
        for index, (name, count, images) in enumerate(zip(self.classes, self.counts, self.images, strict=True)):
            record: dict[str, Any] = {"index": index, "name": name, self.unit: count}
            record["frequency"] = count / total if total else 0.0
            if self.unit != "samples":
                record["images"] = images
            classes.append(record)
        document: dict[str, Any] = {"split": "train", "images": self.split_size, "unit": self.unit}
        if self.unit == "pixels":
            document["ignoredPixels"] = self.ignored
        return {**document, "classes": classes}

    @classmethod
    def from_json(cls, document: dict[str, Any]) -> ClassStats:
        unit = document["unit"]
        counts = tuple(int(record[unit]) for record in document["classes"])
        return cls(
            unit=unit,
            classes=tuple(str(record["name"]) for record in document["classes"]),
            counts=counts,
            images=tuple(int(record.get("images", record[unit])) for record in document["classes"]),
            split_size=int(document["images"]),
            ignored=int(document.get("ignoredPixels", 0)),
        )


def balanced_weights(counts: Sequence[int]) -> list[float]:
    """scikit-learn's compute_class_weight('balanced') over the classes that occur: total / (classes x count_k),
    so a class of average frequency gets 1 and a rarer one more.

    A class that never occurs gets 1 rather than 0 (scikit-learn refuses such a class, and the rule gives
    infinity). 1 neither boosts nor drops it: cross-entropy never sees it as a target either way, and dice
    only normalizes by it, but smp's focal loss scores each class one-versus-rest, so weight 0 would leave that
    class's output untrained, free to win the argmax.
    """
    present = [count for count in counts if count > 0]
    if not present:
        raise InvalidInput("loss.classWeights: auto, but the training split has no labelled pixel or sample")
    total = sum(present)
    return [total / (len(present) * count) if count > 0 else 1.0 for count in counts]


def auto_class_weights(stats: ClassStats | None) -> list[float]:
    """The weights of ``loss.classWeights: auto``, from the statistics build_components attached to TaskData."""
    if stats is None:
        raise RuntimeError("loss.classWeights auto needs the class statistics, and none were counted")
    return balanced_weights(stats.counts)


def _read(store: Store, classes: tuple[str, ...], split_size: int) -> ClassStats | None:
    """The statistics an earlier attempt of this run wrote, unless they describe other data."""
    try:
        stats = ClassStats.from_json(json.loads(store.read_bytes(STATS_KEY)))
    except ObjectNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("%s is unreadable (%s): counting again", store.url(STATS_KEY), exc)
        return None
    if stats.classes != classes or stats.split_size != split_size:
        log.warning("%s describes other training data: counting again", store.url(STATS_KEY))
        return None
    return stats


def class_statistics(
    job: ResolvedTrainingJob,
    world: World,
    *,
    classes: tuple[str, ...],
    split_size: int,
    count: Callable[[], ClassStats],
) -> ClassStats:
    """The run's class statistics: read back from class-stats.json if an earlier attempt wrote it, else counted
    (``count`` runs on every rank: it may all-reduce) and written by rank 0. Rank 0 alone decides which, so no
    rank counts while another reads."""
    store = open_store(job.run_uri, job.spec.storage)
    stats = broadcast_object(_read(store, classes, split_size) if world.is_main else None)
    if stats is not None:
        log.info("class statistics read back from %s", store.url(STATS_KEY))
    else:
        stats = count()
        if world.is_main:
            store.write_bytes(STATS_KEY, json.dumps(stats.to_json(), indent=2).encode())
            log.info("class statistics of the training split written to %s", store.url(STATS_KEY))
    if job.spec.loss.class_weights == "auto" and world.is_main:
        _log_auto_weights(stats)
    return stats


def _log_auto_weights(stats: ClassStats) -> None:
    weights = balanced_weights(stats.counts)
    shown = ", ".join(f"{name}: {weight:.4g}" for name, weight in zip(stats.classes, weights, strict=True))
    log.info("loss.classWeights auto (balanced, from %s per class): %s", stats.unit, shown)
    absent = [name for name, count in zip(stats.classes, stats.counts, strict=True) if count == 0]
    if absent:
        log.warning("classes %s never occur in the training split: weight 1", ", ".join(absent))
