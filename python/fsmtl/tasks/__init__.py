"""What a task is and everything that depends on it: :class:`Task` (name, kind, head width), the
task kinds (binary, multiclass, multilabel, regression, segmentation, depth; one module each,
found by name in :data:`TASK_KINDS`), and per task its loss (:func:`task_loss`), metrics
(:func:`task_metrics`) and boundary checks (:mod:`fsmtl.tasks.checks`)."""

from .kind import TaskKind
from .losses import class_log_probs, task_loss
from .metrics import average_metrics, average_rank, primary_score, task_metrics
from .registry import METRIC_DIRECTION, TASK_KINDS, register_task_kind, task_kind
from .task import Task

__all__ = [
    "METRIC_DIRECTION",
    "TASK_KINDS",
    "Task",
    "TaskKind",
    "average_metrics",
    "average_rank",
    "class_log_probs",
    "primary_score",
    "register_task_kind",
    "task_kind",
    "task_loss",
    "task_metrics",
]
