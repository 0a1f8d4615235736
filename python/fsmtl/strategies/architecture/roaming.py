"""MR, maximum roaming (Pascal, Michiardi, Bost, Huet and Zuluaga, AAAI 2021): task routing
whose masks change during training, one unit at a time, until every task has visited every unit;
then the masks stay fixed."""

from __future__ import annotations

import torch

import fsmtl_kernels as fk

from ...schedule import MaskSchedule
from ..method import Component
from .base import ActivationModulation


def covering_unit_masks(channels: int, num_tasks: int, keep_ratio, generator: torch.Generator) -> torch.Tensor:
    """bool ``[T, channels]``, the authors' initialisation: unit ``j`` first goes to task ``j mod T``
    (diagonals of ``T x channels`` until every unit has a task), then each task draws units it does
    not hold yet, uniformly, until it holds ``resolve_k(keep_ratio, channels)`` (a task that the
    covering already gave more keeps them)."""
    k = fk.resolve_k(keep_ratio, channels, "keep_ratio")
    masks = torch.zeros(num_tasks, channels, dtype=torch.bool)
    masks[torch.arange(channels) % num_tasks, torch.arange(channels)] = True
    for t in range(num_tasks):
        need = k - int(masks[t].sum())
        if need > 0:
            free = (~masks[t]).nonzero().flatten()
            masks[t, free[torch.randperm(free.numel(), generator=generator)[:need]]] = True
    return masks


class MaximumRoaming(ActivationModulation):
    """Per-task unit masks over each modulation point, as the authors' code
    (``Maximum-Roaming-Mutli-Task-Learning``, ``MR_layer.py`` and ``train_*_MR.py``):

    * initialisation: :func:`covering_unit_masks` (every unit starts with at least one task; each
      task holds a share ``keep_ratio`` of the units, the sharing ratio);
    * roaming: every ``every`` optimizer steps, for every point and task, one unit the task has not
      visited yet joins its mask and one of its active units leaves it (both uniformly at random,
      from the strategy's generator), so the number of active units stays fixed;
    * freezing: a task stops roaming in a point once it has visited all its ``C`` units (after
      ``C - k_t`` updates, ``k_t`` the units it holds), and the masks stay fixed for the rest of
      training (no new cycle). The authors' code counts the updates of a layer with the first
      task's ``C - k`` and stops the layer when any task has seen every unit, which leaves a task
      that the covering gave fewer units short of some; here every task visits every unit.

    With a ``schedule`` (what ``fsmtl run`` passes: ``--warmup`` and ``--update-every``), roaming
    starts when the schedule is first due (the end of the warm-up) and ``every`` is set then from
    the measured epoch length, so that every unit is visited within the schedule's period
    (``update_every`` epochs): ``every = max(1, floor(steps_per_epoch * update_every / (C - k)))``
    for the point with the most updates to make. When the first due point is the very first
    step (no warm-up), the epoch length is measured over the first epoch and roaming starts
    after it.

    Args:
        keep_ratio: share of each point's units a task uses.
        every: optimizer steps between updates (without a ``schedule``; the authors update every
            tenth of an epoch).
        schedule: a :class:`~fsmtl.schedule.MaskSchedule` that sets when roaming starts and how
            fast it goes (see above).

    Attributes:
        masks: one bool ``[T, C_i]`` tensor per point; visited: same shapes, the units each task
        has visited; updates: number of roaming updates done; frozen: True once every point has
        made its updates.
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
        self._start: int | None = None  # the step roaming starts at (None: not decided yet)
        self._due = False  # the schedule has been due (roaming starts at the next epoch boundary)

    def build(self, channels, num_tasks, device, dtype) -> None:
        gen = self.context.generator
        self.masks = [covering_unit_masks(c, num_tasks, self.keep_ratio, gen).to(device) for c in channels]
        self.visited = [m.clone() for m in self.masks]

    def modulate(self, index, task, output):
        return output * self.expand(self.masks[index][task], output)

    def free_units(self) -> list[int]:
        """Per point, the updates it makes before freezing (the largest ``C - k_t`` over tasks)."""
        return [int((~m).sum(1).max()) for m in self.masks] if self.masks is not None else []

    @property
    def frozen(self) -> bool:
        return self.masks is not None and self.updates >= max(self.free_units(), default=0)

    def _decide_start(self, epoch: int, step: int, epoch_start: bool) -> None:
        if self._start is not None or self.schedule is None or self.masks is None:
            return
        most = max(max(self.free_units()), 1)
        if self.schedule.unit == "step":
            if self.schedule.due(epoch, step, epoch_start):
                self.every, self._start = max(1, self.schedule.every // most), step
            return
        self._due = self._due or self.schedule.due(epoch, step, epoch_start)
        if self._due and epoch_start and epoch >= 1:  # the epoch length is known from epoch 1 on
            self.every, self._start = max(1, int(step / epoch * self.schedule.every) // most), step

    def updates_at(self, epoch: int, step: int, epoch_start: bool) -> bool:
        self._decide_start(epoch, step, epoch_start)  # the trainer may ask before on_step
        if self.frozen:
            return False
        if self.schedule is None:
            return self._steps > 0 and self._steps % self.every == 0
        if self._start is None:
            return False
        return step >= self._start and (step - self._start) % self.every == 0

    def on_step(self, epoch: int, step: int, epoch_start: bool) -> None:
        self._decide_start(epoch, step, epoch_start)
        if self.updates_at(epoch, step, epoch_start):
            self.roam()
        self._steps += 1

    @torch.no_grad()
    def roam(self) -> None:
        """One update: in every point, each task that has not visited every unit yet swaps one
        active unit for one unit it has not visited."""
        gen = self.context.generator
        for masks, visited in zip(self.masks, self.visited):
            for t in range(masks.shape[0]):
                active, seen = masks[t], visited[t]
                if bool(seen.all()):
                    continue
                fresh = (~seen).nonzero().flatten()
                on = active.nonzero().flatten()
                add = fresh[torch.randint(fresh.numel(), (1,), generator=gen).item()]
                drop = on[torch.randint(on.numel(), (1,), generator=gen).item()]
                active[drop] = False
                active[add] = True
                seen[add] = True
        self.updates += 1

    def own_state(self) -> dict:
        return {
            "masks": self.masks,
            "visited": self.visited,
            "updates": self.updates,
            "steps": self._steps,
            "every": self.every,
            "start": self._start,
            "due": self._due,
        }

    def load_own_state(self, state: dict) -> None:
        self.masks, self.visited = state["masks"], state["visited"]
        self.updates, self._steps = state["updates"], state["steps"]
        self.every, self._start, self._due = state.get("every", self.every), state.get("start"), state.get("due", False)


def _roaming(options) -> MaximumRoaming:
    return MaximumRoaming(options.keep_ratio, schedule=options.schedule)


ARCHITECTURE = Component("mr", "MR", _roaming, MaximumRoaming, plain="mr", sparse=True)
