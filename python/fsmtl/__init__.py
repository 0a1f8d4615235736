"""fsmtl: Fisher Sparse Multi-Task Learning (Zhang et al., AAAI-24), built on ``fsmtl_kernels``.

Two ways to use it:

* the :class:`Trainer` with a strategy (:class:`FisherSparse`, :class:`RandomSparse`,
  :class:`EqualWeighting`, or any method by name through :func:`get_method`), or the ``fsmtl
  run`` command for the paper's comparison;
* your own loop (or Lightning, or the Hugging Face Trainer) with :class:`FSMTL`: the mask
  schedule, the masks and the masked backward in one object; or the pieces alone,
  :func:`compute_masks` (Fisher top-K masks from per-task batches) and
  :func:`masked_multitask_backward` (writes ``.grad``).

Layers, each importing only the ones below it: ``tasks`` (what a task is: kind, loss, metrics,
checks); the core (``gradients``, ``model``, ``estimators``, ``masks``, ``collectives``);
``strategies`` (the methods); ``data`` and ``models`` (benchmarks and trunks); ``engine`` (the
Trainer); ``run`` (the ``fsmtl`` command).
"""

from .engine import Trainer
from .estimators import ESTIMATORS, task_scores
from .gradients import ForwardRecord, MaskedBackwardStream, masked_multitask_backward, per_task_gradients
from .model import MultiTaskModel, count_nonzero_shared
from .schedule import MaskSchedule
from .sparse_training import FSMTL, compute_masks
from .strategies import (
    Composed,
    EqualWeighting,
    FisherSparse,
    RandomSparse,
    Strategy,
    get_method,
)
from .tasks import Task

__all__ = [
    "ESTIMATORS",
    "FSMTL",
    "Composed",
    "EqualWeighting",
    "FisherSparse",
    "ForwardRecord",
    "MaskSchedule",
    "MaskedBackwardStream",
    "MultiTaskModel",
    "RandomSparse",
    "Strategy",
    "Task",
    "Trainer",
    "compute_masks",
    "count_nonzero_shared",
    "get_method",
    "masked_multitask_backward",
    "per_task_gradients",
    "task_scores",
]
