"""Fisher estimation engine: exact sums of squared per-sample gradients of a module's parameters.

``sum_grad_squared(module, closure)`` returns ``sum_n (d loss_n / d p)**2`` for every parameter,
from one batched backward plus exact per-layer rules (:mod:`.rules`), with a chunked
``torch.autograd.grad(..., is_grads_batched=True)`` fallback for everything else.
"""

from .engine import sum_grad_squared
from .rules import SUPPORTED_MODULES

__all__ = ["SUPPORTED_MODULES", "sum_grad_squared"]
