"""Training strategies, one per file, grouped by family: ``weighting/`` (dense sharing) and
``sparse/`` (task masks over the shared trunk). Every method of the comparison is a
:class:`Method` in :data:`METHODS`."""

from .base import Strategy, TrainingContext
from .method import Method, MethodOptions
from .registry import METHODS, get_method, register_method
from .sparse.fisher import FisherSparse
from .sparse.random import RandomSparse
from .sparse.schedule import MaskSchedule
from .weighting.equal import EqualWeighting
from .weighting.jacobian import AGGREGATORS, JacobianAggregation

__all__ = [
    "AGGREGATORS",
    "METHODS",
    "EqualWeighting",
    "FisherSparse",
    "JacobianAggregation",
    "MaskSchedule",
    "Method",
    "MethodOptions",
    "RandomSparse",
    "Strategy",
    "TrainingContext",
    "get_method",
    "register_method",
]
