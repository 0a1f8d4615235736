"""The records of the method registry: a :class:`Method` (one name of ``fsmtl run --methods``:
how to build its strategy, its table label, what it needs) and a :class:`Component` (one entry
of an axis of the composed methods: an architecture or a weighting)."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field

from ..schedule import MaskSchedule
from .base import Strategy


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


@dataclass(frozen=True)
class Component:
    """One entry of an axis of the composed methods (``ARCH+WEIGHTING``).

    Attributes:
        name: the name in a composed method (``tr`` in ``tr+gradnorm``).
        label: the name in tables (``TR``).
        factory: builds a fresh architecture (an
            :class:`~fsmtl.strategies.architecture.base.Architecture`) or weighting (a dense
            :class:`~fsmtl.strategies.base.Strategy`) from :class:`MethodOptions`.
        strategy: the class the factory builds.
        plain: the method name of the component alone (an architecture with equal weights, a
            weighting on the shared trunk): ``tr``, ``gradnorm``, ``mtl`` for ``equal``.
        plain_label: the table label of the plain method (default: ``label``).
        sparse: (architectures) the component has a keep ratio, chosen on validation.
        requires: importable top-level packages it needs beyond the core install.
    """

    name: str
    label: str
    factory: Callable[[MethodOptions], object]
    strategy: type
    plain: str
    plain_label: str | None = None
    sparse: bool = False
    requires: tuple[str, ...] = ()
