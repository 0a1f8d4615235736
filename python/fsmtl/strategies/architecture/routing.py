"""TR, task routing (Strezoski, Noord and Worring, ICCV 2019, "Many task learning with task
routing"): each task passes a fixed random subset of every layer's output channels."""

from __future__ import annotations

import torch

import fsmtl_kernels as fk

from ..method import Component
from .base import ActivationModulation


def random_unit_masks(channels: int, num_tasks: int, keep_ratio, generator: torch.Generator) -> torch.Tensor:
    """bool ``[T, channels]``: each row keeps exactly ``resolve_k(keep_ratio, channels)`` random units."""
    k = fk.resolve_k(keep_ratio, channels, "keep_ratio")
    masks = torch.zeros(num_tasks, channels, dtype=torch.bool)
    for t in range(num_tasks):
        masks[t, torch.randperm(channels, generator=generator)[:k]] = True
    return masks


class TaskRouting(ActivationModulation):
    """Task ``t`` multiplies each modulation point's output channels (conv) or units (Linear) by
    a binary mask with a share ``keep_ratio`` of ones, drawn once at :meth:`bind` from the
    strategy's generator and fixed for the whole training (the paper's "sigma" is
    ``1 - keep_ratio``). Shared weights are dense and trained by the task average.

    Attributes:
        masks: one bool ``[T, C_i]`` tensor per modulation point.
    """

    def __init__(self, keep_ratio: float | int = 0.9, points=None) -> None:
        super().__init__(points)
        self.keep_ratio = keep_ratio
        self.masks: list[torch.Tensor] | None = None

    def build(self, channels, num_tasks, device, dtype) -> None:
        gen = self.context.generator
        self.masks = [random_unit_masks(c, num_tasks, self.keep_ratio, gen).to(device) for c in channels]

    def modulate(self, index, task, output):
        return output * self.expand(self.masks[index][task], output)

    def own_state(self) -> dict:
        return {"masks": self.masks}

    def load_own_state(self, state: dict) -> None:
        self.masks = state["masks"]


def _routing(options) -> TaskRouting:
    return TaskRouting(options.keep_ratio)


ARCHITECTURE = Component("tr", "TR", _routing, TaskRouting, plain="tr", sparse=True)
