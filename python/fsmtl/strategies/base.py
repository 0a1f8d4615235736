"""The strategy interface: how per-task losses become the update of a multi-task model.

The :class:`~fsmtl.trainer.Trainer` holds a model, the task list and one strategy; every
method-specific decision (masks, their schedule, how task gradients combine) lives in the
strategy, so the Trainer has no method-specific branches.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..data import Task
from ..model import MultiTaskModel

Sampler = Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class TrainingContext:
    """What a strategy may use: the model, the tasks, and ``sample(t, n) -> (inputs, targets)``
    drawing ``n`` training examples of task ``t`` on the model's device."""

    model: MultiTaskModel
    tasks: Sequence[Task]
    sample: Sampler
    generator: torch.Generator


class Strategy(ABC):
    """Base class of all training strategies."""

    def bind(self, context: TrainingContext) -> None:
        """Called once by ``Trainer.fit`` before the first step."""
        self.context = context

    def on_step(self, epoch: int, step: int, epoch_start: bool) -> dict | None:
        """Called before every step; returns a record when it changed state (e.g. a mask update)."""
        return None

    def forward_mask(self, task: int) -> list[torch.Tensor] | None:
        """Masks to apply to the trunk in task ``task``'s forward (Eq. 3), or None."""
        return None

    @abstractmethod
    def backward(self, losses: Sequence[torch.Tensor]) -> None:
        """Write ``.grad`` of every trainable parameter from the T task losses of one step."""

    def before_optimizer_step(self) -> None:  # noqa: B027 (optional hook)
        """Hook run right before ``optimizer.step()``."""

    def after_optimizer_step(self) -> None:  # noqa: B027 (optional hook)
        """Hook run right after ``optimizer.step()``."""
