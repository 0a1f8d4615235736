"""fsmtl: Fisher Sparse Multi-Task Learning (Zhang et al., AAAI-24), built on ``fsmtl_kernels``.

Two ways to use it:

* the :class:`Trainer` with a strategy (:class:`FisherSparse`, :class:`RandomSparse`,
  :class:`EqualWeighting`), or the ``fsmtl run`` command for the paper's comparison;
* the pieces in your own loop: :func:`compute_masks` (Fisher top-K masks from per-task
  batches) and :func:`masked_multitask_backward` (writes ``.grad``).
"""

from .estimators import ESTIMATORS, task_scores
from .gradients import MaskedBackwardStream, masked_multitask_backward, per_task_gradients
from .masks import compute_masks
from .model import MultiTaskModel, count_nonzero_shared
from .strategies import EqualWeighting, FisherSparse, MaskSchedule, RandomSparse, Strategy
from .trainer import Trainer

__all__ = [
    "ESTIMATORS",
    "EqualWeighting",
    "FisherSparse",
    "MaskSchedule",
    "MultiTaskModel",
    "RandomSparse",
    "Strategy",
    "Trainer",
    "compute_masks",
    "count_nonzero_shared",
    "MaskedBackwardStream",
    "masked_multitask_backward",
    "per_task_gradients",
    "task_scores",
]
