"""The strategy contract: how per-task losses become the update of a multi-task model.

The :class:`~fsmtl.engine.Trainer` holds a model, the task list and one strategy; every
method-specific decision (masks, their schedule, how task gradients combine, per-task modulation
of the trunk) lives in the strategy, so the Trainer has no method-specific branches. Every member
the engine or the ``fsmtl`` command calls is declared here, with its default.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

import fsmtl_kernels as fk

from ..gradients import ForwardRecord, MaskedBackwardStream
from ..model import MultiTaskModel
from ..tasks import Task

Sampler = Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class TrainingContext:
    """What a strategy may use: the model, the tasks, ``sample(t, n) -> (inputs, targets)``
    drawing ``n`` training examples of task ``t`` on the model's device, the strategy's own
    random generator, ``task_parameters``: trainable tensors besides the heads that each belong
    to one task (an architecture's per-task modules), which a weighting treats like the heads,
    ``has_data``: False when bound without training data (a state loaded before ``fit``),
    where ``sample`` raises, and ``homogeneous``: whether the tasks share their inputs."""

    model: MultiTaskModel
    tasks: Sequence[Task]
    sample: Sampler
    generator: torch.Generator
    task_parameters: Sequence[torch.Tensor] = ()
    has_data: bool = True
    homogeneous: bool = True


class Strategy(ABC):
    """Base class of all training strategies.

    Attributes:
        modulates_forward: True when the strategy modulates trunk activations per task (forward
            hooks that read ``model.current_task``, as SE, task routing and maximum roaming do):
            the Trainer then runs one forward per task, ``model(x, t)``, even when all tasks share
            their inputs.
        in_turns: True when each step updates the tasks in turns, one optimizer step per task
            (the Trainer then calls :meth:`backward_task` once per task instead of
            :meth:`backward` once).
        mask: the current task masks over ``model.masked_parameters()`` (sparse strategies), None
            otherwise or before the first mask update.
    """

    modulates_forward: bool = False
    in_turns: bool = False
    mask: fk.PackedMask | None = None

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

    def task_parameters(self) -> list[torch.Tensor]:
        """The parameters that belong to one task each: the heads, then the context's
        ``task_parameters`` (each gets its own task's gradient, never the shared combination)."""
        return self.context.model.head_parameters() + list(self.context.task_parameters)

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

    def updates_at(self, epoch: int, step: int, epoch_start: bool) -> bool:
        """True when :meth:`on_step` at this position recomputes the strategy's masks (the progress
        display shows the phase ``mask update`` while it runs)."""
        return False

    def on_step(self, epoch: int, step: int, epoch_start: bool) -> dict | None:
        """Called before every step; returns a record when it changed state (e.g. a mask update)."""
        return None

    @property
    def phase(self) -> str:
        """The training phase the progress display shows between mask updates: ``"warm-up"``
        (dense training before a sparse strategy's first mask) or ``"training"``."""
        return "training"

    def forward_mask(self, task: int) -> list[torch.Tensor] | None:
        """Masks to apply to the trunk in task ``task``'s forward (Eq. 3), or None."""
        return None

    def forward_record(self) -> ForwardRecord | None:
        """A fresh :class:`~fsmtl.ForwardRecord` for one step's forwards when :meth:`backward`
        uses what they leave (the boundary below the masks, the masked Linear calls); None: the
        forwards record nothing."""
        return None

    def streams_backward(self) -> bool:
        """True when a step whose tasks run separate trunk forwards may pass its losses one task
        at a time to :meth:`open_backward_stream` (each task's backward right after its forward)
        instead of all at once to :meth:`backward`. False here: a method that combines the T
        gradients together (MGDA, GradNorm, ...) needs every loss first."""
        return False

    def open_backward_stream(self) -> MaskedBackwardStream:
        """This step's backward for losses that arrive one task at a time (only when
        :meth:`streams_backward` is True): the caller runs task t's forward, its loss and
        ``stream.backward(t, loss)`` before task t + 1's forward, then ``stream.finish()`` (or
        ``stream.close()`` to abandon the step without writing ``.grad``)."""
        raise RuntimeError(f"{type(self).__name__} takes every task's loss at once (streams_backward() is False)")

    @abstractmethod
    def backward(self, losses: Sequence[torch.Tensor], record: ForwardRecord | None = None) -> None:
        """Write ``.grad`` of every trainable parameter from the T task losses of one step;
        ``record`` is what the step's forwards left in :meth:`forward_record`'s record."""

    def backward_task(self, task: int, loss: torch.Tensor) -> None:
        """Write ``.grad`` for task ``task``'s own update (strategies with :attr:`in_turns`)."""
        raise RuntimeError(f"{type(self).__name__} does not update the tasks in turns (in_turns is False)")

    def sharding_unsupported(self) -> str | None:
        """None when the strategy trains a model sharded with FSDP2 (``Trainer(parallel="fsdp")``);
        otherwise why not, in one line. By default a strategy combines each task's full gradient of
        the shared parameters, which FSDP never forms."""
        return (
            f"{type(self).__name__} combines each task's full gradient of the shared parameters, which a model "
            "sharded with FSDP never forms"
        )

    def before_optimizer_step(self) -> None:  # noqa: B027 (optional hook)
        """Hook run right before ``optimizer.step()``."""

    def after_optimizer_step(self) -> None:  # noqa: B027 (optional hook)
        """Hook run right after ``optimizer.step()``."""
