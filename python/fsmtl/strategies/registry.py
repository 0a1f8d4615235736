"""Every method by name: :data:`METHODS`, filled from the ``METHODS`` tuple of each strategy
module. Adding one: a strategy module that defines its :class:`~fsmtl.strategies.method.Method`
records, and its name in the tuple at the bottom (or :func:`register_method` from user code)."""

from __future__ import annotations

from .balancing import gradnorm, mgda_ub, rlw
from .method import Method
from .modulation import roaming, routing, se
from .sparse import fisher, random, variants
from .weighting import equal, jacobian

METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    if not isinstance(method, Method):
        raise TypeError(f"method must be a Method, got {type(method).__name__}")
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    """The registered method ``name``; ValueError naming the known methods otherwise."""
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise ValueError(f"method {name!r} is not one of {tuple(METHODS)}") from None


# Table order: dense baselines, sparse methods, the gradient-balancing peers, then the per-task
# activation modulations.
for _module in (equal, random, fisher, variants, jacobian, gradnorm, mgda_ub, rlw, se, routing, roaming):
    for _method in _module.METHODS:
        register_method(_method)
