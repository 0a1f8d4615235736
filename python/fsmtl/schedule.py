"""When masks are (re)computed: after a dense warm-up, every ``every`` epochs or steps."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MaskSchedule:
    """Algorithm 1's update condition.

    Attributes:
        warmup: epochs (or steps) of dense MTL before the first mask update.
        every: recompute the masks every ``every`` epochs (or steps) after the warm-up.
        unit: ``"epoch"`` or ``"step"``.
    """

    warmup: int = 1
    every: int = 1
    unit: str = "epoch"

    def __post_init__(self) -> None:
        for name in ("warmup", "every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        if self.every < 1:
            raise ValueError(f"every must be >= 1, got {self.every}")
        if self.unit not in ("epoch", "step"):
            raise ValueError(f"unit must be 'epoch' or 'step', got {self.unit!r}")

    def due(self, epoch: int, step: int, epoch_start: bool) -> bool:
        if self.unit == "epoch":
            return epoch_start and epoch >= self.warmup and (epoch - self.warmup) % self.every == 0
        return step >= self.warmup and (step - self.warmup) % self.every == 0
