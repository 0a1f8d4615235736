"""Training strategies, one per file, grouped by family: ``weighting/`` (dense sharing) and
``sparse/`` (task masks over the shared trunk)."""

from .base import Strategy, TrainingContext
from .sparse.fisher import FisherSparse
from .sparse.random import RandomSparse
from .sparse.schedule import MaskSchedule
from .weighting.equal import EqualWeighting

__all__ = ["EqualWeighting", "FisherSparse", "MaskSchedule", "RandomSparse", "Strategy", "TrainingContext"]
