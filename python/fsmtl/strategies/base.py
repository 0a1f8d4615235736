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

    #: True when the strategy modulates trunk activations per task (forward hooks that read
    #: ``model.current_task``, as SE, task routing and maximum roaming do): the Trainer then runs
    #: one forward per task, ``model(x, t)``, even when all tasks share their inputs.
    modulates_forward: bool = False

    @property
    def context(self) -> TrainingContext:
        """The bound model, tasks and data; a clear error instead of ``AttributeError`` before ``fit``."""
        context = self.__dict__.get("_context")
        if context is None:
            raise RuntimeError(
                f"{type(self).__name__} is not bound to a model yet: "
                "call Trainer.fit (or Trainer.load_state_dict) first"
            )
        return context

    @context.setter
    def context(self, value: TrainingContext) -> None:
        self.__dict__["_context"] = value

    def bind(self, context: TrainingContext) -> None:
        """Called by ``Trainer.fit`` (every call) and ``Trainer.load_state_dict`` before any step."""
        self.context = context

    def on_fit_start(self, epochs: range, steps_per_epoch: int | None) -> None:  # noqa: B027 (optional hook)
        """Called by ``Trainer.fit`` with the epoch indices it will train (e.g. to warn when a
        schedule does nothing within them)."""

    def state_dict(self) -> dict:
        """The strategy's own state for a checkpoint (the Trainer saves the RNG streams)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`; called after :meth:`bind`."""
        if state:
            raise ValueError(f"{type(self).__name__} has no state, got keys {sorted(state)}")

    def on_step(self, epoch: int, step: int, epoch_start: bool) -> dict | None:
        """Called before every step; returns a record when it changed state (e.g. a mask update)."""
        return None

    def forward_mask(self, task: int) -> list[torch.Tensor] | None:
        """Masks to apply to the trunk in task ``task``'s forward (Eq. 3), or None."""
        return None

    def streams_backward(self) -> bool:
        """True when a step whose tasks run separate trunk forwards may pass its losses one task
        at a time to ``open_backward_stream()`` (each task's backward right after its forward)
        instead of all at once to :meth:`backward`. False here: a method that combines the T
        gradients together (MGDA, GradNorm, ...) needs every loss first."""
        return False

    @abstractmethod
    def backward(self, losses: Sequence[torch.Tensor]) -> None:
        """Write ``.grad`` of every trainable parameter from the T task losses of one step."""

    def before_optimizer_step(self) -> None:  # noqa: B027 (optional hook)
        """Hook run right before ``optimizer.step()``."""

    def after_optimizer_step(self) -> None:  # noqa: B027 (optional hook)
        """Hook run right after ``optimizer.step()``."""
