"""Task kinds (binary, multiclass, regression, segmentation, depth): one module each, found by
name in :data:`TASK_KINDS`. A kind holds its loss, log-probabilities, target checks, metrics and
primary metric."""

from .kind import TaskKind
from .registry import METRIC_DIRECTION, TASK_KINDS, register_task_kind, task_kind

__all__ = ["METRIC_DIRECTION", "TASK_KINDS", "TaskKind", "register_task_kind", "task_kind"]
