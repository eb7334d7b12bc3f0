"""Task plugins. Each registers a ``TaskInfo`` whose factory imports its module lazily."""

from __future__ import annotations

from kiln.trainer.tasks.base import TASKS, Task, TaskInfo, create_task


def _classification() -> Task:
    from kiln.trainer.tasks.classification import ClassificationTask

    return ClassificationTask()


TASKS.register(TaskInfo("classification", _classification, "timm image classifiers on imagefolder or csv data"))

__all__ = ["TASKS", "Task", "TaskInfo", "create_task"]
