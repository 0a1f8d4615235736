"""Gradients of the shared trunk in a multi-task step: the public API (:mod:`.backward`), what a
forward records for its backward (:mod:`.record`), what the autograd graph says about the
parameters (:mod:`.graph`), the running sums the task gradients stream into (:mod:`.accumulate`)
and how the T task gradients are taken (:mod:`.batching`)."""

from .backward import (
    BackwardPath,
    MaskedBackwardStream,
    dense_multitask_backward,
    masked_multitask_backward,
    per_task_gradients,
)
from .batching import AUTO_BATCHED_MAX_ENTRIES, MeasuredBatching, auto_batched
from .record import ForwardRecord

__all__ = [
    "AUTO_BATCHED_MAX_ENTRIES",
    "BackwardPath",
    "ForwardRecord",
    "MaskedBackwardStream",
    "MeasuredBatching",
    "auto_batched",
    "dense_multitask_backward",
    "masked_multitask_backward",
    "per_task_gradients",
]
