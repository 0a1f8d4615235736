"""A task of a multi-task problem: its name, its kind (what it predicts) and its head width."""

from __future__ import annotations

from dataclasses import dataclass

from .registry import TASK_KINDS


@dataclass(frozen=True)
class Task:
    """One task of a benchmark.

    Attributes:
        name: short identifier, unique within a benchmark (used as a column name in result tables).
        kind: a name in :data:`fsmtl.tasks.TASK_KINDS`: ``"binary"``, ``"multiclass"``, ``"regression"``,
            ``"segmentation"`` or ``"depth"``.
        num_outputs: width of the task head: 1 for binary, regression and depth; the number of
            classes C for multiclass and segmentation.
    """

    name: str
    kind: str
    num_outputs: int

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"Task.name must be a non-empty string, got {self.name!r}")
        if not isinstance(self.kind, str) or self.kind not in TASK_KINDS:
            raise ValueError(f"Task.kind must be one of {tuple(TASK_KINDS)}, got {self.kind!r}")
        if isinstance(self.num_outputs, bool) or not isinstance(self.num_outputs, int):
            raise TypeError(f"Task.num_outputs must be an int, got {type(self.num_outputs).__name__}")
        TASK_KINDS[self.kind].check_num_outputs(self.num_outputs)
