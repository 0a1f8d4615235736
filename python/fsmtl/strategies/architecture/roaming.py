"""MR, maximum roaming (Pascal, Michiardi, Bost, Huet and Zuluaga, AAAI 2021): task routing
whose masks change during training, one unit at a time, so that every task visits every unit."""

from __future__ import annotations

import torch

from ...schedule import MaskSchedule
from ..method import Component
from .base import ActivationModulation
from .routing import random_unit_masks


class MaximumRoaming(ActivationModulation):
    """Per-task unit masks with a share ``keep_ratio`` of ones (the sharing ratio p), initialised
    at random as in :class:`~fsmtl.strategies.architecture.routing.TaskRouting`; every ``every``
    optimizer steps, for every point and task, one active unit leaves the mask and one unit the
    task has not visited yet in the current cycle joins it (both uniformly at random, from the
    strategy's generator). Once a task has visited every unit of a point, its visited set restarts
    from its current mask. So the number of active units stays fixed and each task visits all
    ``C`` units within ``C - k`` updates.

    Args:
        keep_ratio: share of each point's units a task uses.
        every: optimizer steps between updates (when no ``schedule`` is given).
        schedule: a :class:`~fsmtl.schedule.MaskSchedule` to roam on instead
            of ``every`` steps: ``fsmtl run`` passes its mask schedule (``--warmup``,
            ``--update-every``), so MR's masks change when the sparse methods' masks do and a
            short run still roams (with ``every=100`` a 72-step run would never roam and MR
            would be TR).

    Attributes:
        masks: one bool ``[T, C_i]`` tensor per point; visited: same shapes, units visited in
        the current cycle; updates: number of updates done.
    """

    def __init__(
        self, keep_ratio: float | int = 0.9, every: int = 100, points=None, schedule: MaskSchedule | None = None
    ) -> None:
        super().__init__(points)
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive int, got {every!r}")
        if schedule is not None and not isinstance(schedule, MaskSchedule):
            raise TypeError(f"schedule must be a MaskSchedule or None, got {type(schedule).__name__}")
        self.schedule = schedule
        self.keep_ratio = keep_ratio
        self.every = every
        self.masks: list[torch.Tensor] | None = None
        self.visited: list[torch.Tensor] | None = None
        self.updates = 0
        self._steps = 0

    def build(self, channels, num_tasks, device, dtype) -> None:
        gen = self.context.generator
        self.masks = [random_unit_masks(c, num_tasks, self.keep_ratio, gen).to(device) for c in channels]
        self.visited = [m.clone() for m in self.masks]

    def modulate(self, index, task, output):
        return output * self.expand(self.masks[index][task], output)

    def updates_at(self, epoch: int, step: int, epoch_start: bool) -> bool:
        if self.schedule is not None:
            return self.schedule.due(epoch, step, epoch_start)
        return self._steps > 0 and self._steps % self.every == 0

    def on_step(self, epoch: int, step: int, epoch_start: bool) -> None:
        if self.updates_at(epoch, step, epoch_start):
            self.roam()
        self._steps += 1

    @torch.no_grad()
    def roam(self) -> None:
        """One update: swap one active unit for one unvisited unit in every (point, task) mask."""
        gen = self.context.generator
        for masks, visited in zip(self.masks, self.visited):
            for t in range(masks.shape[0]):
                active, seen = masks[t], visited[t]
                if bool(seen.all()):
                    seen.copy_(active)
                fresh = (~seen).nonzero().flatten()
                on = active.nonzero().flatten()
                if fresh.numel() == 0 or on.numel() == 0:
                    continue
                add = fresh[torch.randint(fresh.numel(), (1,), generator=gen).item()]
                drop = on[torch.randint(on.numel(), (1,), generator=gen).item()]
                active[drop] = False
                active[add] = True
                seen[add] = True
        self.updates += 1

    def own_state(self) -> dict:
        return {"masks": self.masks, "visited": self.visited, "updates": self.updates, "steps": self._steps}

    def load_own_state(self, state: dict) -> None:
        self.masks, self.visited = state["masks"], state["visited"]
        self.updates, self._steps = state["updates"], state["steps"]


def _roaming(options) -> MaximumRoaming:
    return MaximumRoaming(options.keep_ratio, schedule=options.schedule)


ARCHITECTURE = Component("mr", "MR", _roaming, MaximumRoaming, plain="mr", sparse=True)
