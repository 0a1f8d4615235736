"""The record of one method of the comparison (``fsmtl run --methods``): how to build its
strategy, its table label, and what it needs."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field

from .base import Strategy
from .sparse.schedule import MaskSchedule


@dataclass(frozen=True)
class MethodOptions:
    """The run settings a method's factory may use; each factory takes the ones it needs."""

    keep_ratio: float | int = 1.0
    schedule: MaskSchedule = field(default_factory=MaskSchedule)
    samples: int = 256
    mask_forward: bool = False
    normalize: str = "tasks"


@dataclass(frozen=True)
class Method:
    """One method by name.

    Attributes:
        name: the name on the command line and in results (``fs``, ``mgda``, ...).
        label: the name in tables and figures (``FS``, ``MGDA``, ...).
        factory: builds a fresh strategy from :class:`MethodOptions`.
        strategy: the strategy class the factory builds.
        variant: which variant of ``strategy`` this entry selects (FisherSparse's estimator,
            JacobianAggregation's aggregator), None when the class has one behaviour.
        sparse: the method has a keep ratio, chosen on validation, and task masks.
        single_task: one model per task (STL) instead of one multi-task model.
        requires: importable top-level packages the method needs beyond the core install.
    """

    name: str
    label: str
    factory: Callable[[MethodOptions], Strategy]
    strategy: type[Strategy]
    variant: str | None = None
    sparse: bool = False
    single_task: bool = False
    requires: tuple[str, ...] = ()

    def missing_packages(self) -> list[str]:
        """The packages of :attr:`requires` that are not installed here."""
        return [p for p in self.requires if importlib.util.find_spec(p) is None]

    def build(self, options: MethodOptions | None = None) -> Strategy:
        return self.factory(options if options is not None else MethodOptions())
