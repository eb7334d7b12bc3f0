"""Task plugins. Each registers a ``TaskInfo`` whose factory imports its module lazily."""

from __future__ import annotations

from kiln.trainer.tasks.base import TASKS, Task, TaskInfo, create_task


def _classification() -> Task:
    from kiln.trainer.tasks.classification import ClassificationTask

    return ClassificationTask()


def _segmentation() -> Task:
    from kiln.trainer.tasks.segmentation import SegmentationTask

    return SegmentationTask()


def _detection() -> Task:
    from kiln.trainer.tasks.detection import DetectionTask

    return DetectionTask()


TASKS.register(TaskInfo("classification", _classification, "timm image classifiers on imagefolder or csv data"))
TASKS.register(TaskInfo("segmentation", _segmentation, "smp networks on segmentation-folder or csv masks"))
TASKS.register(TaskInfo("detection", _detection, "torchvision detectors on coco, yolo or voc boxes"))

__all__ = ["TASKS", "Task", "TaskInfo", "create_task"]
