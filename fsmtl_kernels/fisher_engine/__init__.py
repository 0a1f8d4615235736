"""Fisher estimation engine: exact sums of squared per-sample gradients of a module's parameters.

``sum_grad_squared(module, closure)`` returns ``sum_n (d loss_n / d p)**2`` for every parameter,
from one batched backward plus exact per-layer rules (:mod:`.rules`; attention in
:mod:`.attention`, parameters broadcast into the batch in :mod:`.broadcast`), with the fallbacks
of :mod:`.fallback` (announced by a :class:`FisherFallbackWarning`) for everything else.
"""

from .engine import FisherFallbackWarning, sum_grad_squared
from .rules import SUPPORTED_MODULES

__all__ = ["SUPPORTED_MODULES", "FisherFallbackWarning", "sum_grad_squared"]
