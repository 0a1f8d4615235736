"""The task kinds by name. Adding a kind: a module with a :class:`~fsmtl.tasks.kind.TaskKind`
subclass, and its instance in the tuple below (or :func:`register_task_kind` from user code)."""

from __future__ import annotations

from . import binary, depth, multiclass, multilabel, regression, segmentation
from .kind import TaskKind

TASK_KINDS: dict[str, TaskKind] = {}
# Metric name -> True when higher is better, over every registered kind.
METRIC_DIRECTION: dict[str, bool] = {}


def register_task_kind(kind: TaskKind) -> TaskKind:
    """Add ``kind`` under ``kind.name``; its metrics must agree in direction with those already known."""
    if not isinstance(kind, TaskKind):
        raise TypeError(f"kind must be a TaskKind, got {type(kind).__name__}")
    if kind.name in TASK_KINDS:
        raise ValueError(f"task kind {kind.name!r} is already registered")
    if kind.primary_metric not in kind.metrics:
        raise ValueError(f"task kind {kind.name!r}: primary_metric {kind.primary_metric!r} is not one of its metrics")
    clash = [m for m, up in kind.metrics.items() if METRIC_DIRECTION.get(m, up) != up]
    if clash:
        raise ValueError(f"task kind {kind.name!r}: metrics {clash} are registered with the opposite direction")
    TASK_KINDS[kind.name] = kind
    METRIC_DIRECTION.update(kind.metrics)
    return kind


def task_kind(name: str) -> TaskKind:
    """The registered kind ``name``; ValueError naming the known kinds otherwise."""
    try:
        return TASK_KINDS[name]
    except (KeyError, TypeError):
        raise ValueError(f"task kind {name!r} is not one of {tuple(TASK_KINDS)}") from None


for _module in (binary, multiclass, regression, segmentation, depth, multilabel):
    register_task_kind(_module.KIND)
