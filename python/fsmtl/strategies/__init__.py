"""Training strategies, one per file, grouped by family: ``weighting/`` (dense sharing) and
``sparse/`` (task masks over the shared trunk)."""

from .base import Strategy, TrainingContext
from .sparse.fisher import FisherSparse
from .sparse.random import RandomSparse
from .sparse.schedule import MaskSchedule
from .weighting.equal import EqualWeighting
from .weighting.jacobian import AGGREGATORS, JacobianAggregation

__all__ = [
    "AGGREGATORS",
    "EqualWeighting",
    "JacobianAggregation",
    "FisherSparse",
    "MaskSchedule",
    "RandomSparse",
    "Strategy",
    "TrainingContext",
]
