"""Training strategies, one per file, grouped by family: ``sparse/`` (task masks over the shared
trunk: FS and its variants, RS), ``weighting/`` (how the task gradients of densely shared
parameters combine: MTL, GradNorm, MGDA-UB, RLW, torchjd's aggregators) and ``architecture/``
(per-task modulation of the trunk: SE, TR, MR). An architecture and a weighting compose
(:class:`Composed`, ``ARCH+WEIGHTING``). Every method of the comparison is found by name through
:func:`get_method`."""

from ..schedule import MaskSchedule
from .architecture.base import Architecture
from .base import Strategy, TrainingContext
from .composed import Composed
from .method import Component, Method, MethodOptions
from .registry import ARCHITECTURES, METHODS, WEIGHTINGS, get_method, register_method
from .sparse.base import SparseStrategy
from .sparse.fisher import FisherSparse
from .sparse.random import RandomSparse
from .weighting.equal import EqualWeighting
from .weighting.jacobian import AGGREGATORS, JacobianAggregation

__all__ = [
    "AGGREGATORS",
    "ARCHITECTURES",
    "METHODS",
    "WEIGHTINGS",
    "Architecture",
    "Component",
    "Composed",
    "EqualWeighting",
    "FisherSparse",
    "JacobianAggregation",
    "MaskSchedule",
    "Method",
    "MethodOptions",
    "RandomSparse",
    "SparseStrategy",
    "Strategy",
    "TrainingContext",
    "get_method",
    "register_method",
]
