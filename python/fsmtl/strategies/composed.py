"""A composed method: an architecture (how each task uses the shared trunk) with a weighting (how
the task gradients of the shared weights combine), the two axes LibMTL's
``Trainer(weighting, architecture)`` combines; written ``ARCH+WEIGHTING`` (``tr+gradnorm``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from ..gradients import ForwardRecord
from .architecture.base import Architecture
from .base import Strategy, TrainingContext
from .sparse.base import SparseStrategy


class Composed(Strategy):
    """Task ``t``'s forward runs through ``architecture``'s per-task routing of the trunk; the
    T losses of a step go to ``weighting``, which writes the update of the shared weights, the
    heads, and the architecture's own per-task parameters (treated like the heads: each gets its
    own task's gradient, weighted as the weighting weights that task's head).

    Args:
        architecture: an :class:`~fsmtl.strategies.architecture.base.Architecture` (SE, TR, MR).
        weighting: a dense strategy that combines the task gradients of the shared parameters
            (EqualWeighting, GradNorm, MGDA-UB, RLW, JacobianAggregation); not one that masks the
            trunk, updates the tasks in turns or modulates the forward itself.
    """

    modulates_forward = True

    def __init__(self, architecture: Architecture, weighting: Strategy) -> None:
        if not isinstance(architecture, Architecture):
            raise TypeError(f"architecture must be an Architecture, got {type(architecture).__name__}")
        if not isinstance(weighting, Strategy):
            raise TypeError(f"weighting must be a Strategy, got {type(weighting).__name__}")
        if weighting.modulates_forward or weighting.in_turns or isinstance(weighting, SparseStrategy):
            raise ValueError(
                f"{type(weighting).__name__} is not a weighting of the shared parameters (it masks, modulates or "
                "updates in turns): compose an architecture with a dense weighting"
            )
        self.architecture = architecture
        self.weighting = weighting

    def bind(self, context: TrainingContext) -> None:
        super().bind(context)
        self.architecture.bind(context)
        own = [*context.task_parameters, *self.architecture.parameters()]
        self.weighting.bind(dataclasses.replace(context, task_parameters=own))

    def task_parameters(self) -> list[torch.Tensor]:
        return self.weighting.task_parameters()

    def on_fit_start(self, epochs: range, steps_per_epoch: int | None) -> None:
        self.weighting.on_fit_start(epochs, steps_per_epoch)

    def updates_at(self, epoch: int, step: int, epoch_start: bool) -> bool:
        return self.architecture.updates_at(epoch, step, epoch_start)

    def on_step(self, epoch: int, step: int, epoch_start: bool) -> dict | None:
        self.architecture.on_step(epoch, step, epoch_start)
        return self.weighting.on_step(epoch, step, epoch_start)

    def forward_record(self) -> ForwardRecord | None:
        return self.weighting.forward_record()

    def backward(self, losses: Sequence[torch.Tensor], record: ForwardRecord | None = None) -> None:
        self.weighting.backward(losses, record)

    def before_optimizer_step(self) -> None:
        self.weighting.before_optimizer_step()

    def after_optimizer_step(self) -> None:
        self.weighting.after_optimizer_step()
        self.architecture.after_optimizer_step()

    def state_dict(self) -> dict:
        return {"architecture": self.architecture.state_dict(), "weighting": self.weighting.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != {"architecture", "weighting"}:
            raise ValueError(f"not the state of a composed method: keys {sorted(state)}")
        self.architecture.load_state_dict(state["architecture"])
        self.weighting.load_state_dict(state["weighting"])
