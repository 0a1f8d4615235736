"""MTL with equal task weights: the shared update is the average of the task gradients."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ...gradients import ForwardRecord, dense_multitask_backward
from ..base import Strategy
from ..method import Component, Method


class EqualWeighting(Strategy):
    """Dense MTL (the paper's "MTL" baseline, and "STL" on a one-task model).

    The shared trunk gets ``1/T sum_t grad L_t`` and each head its own ``grad L_t``, in one
    backward pass; this equals :class:`~fsmtl.strategies.FisherSparse` with every mask full.
    """

    def sharding_unsupported(self) -> str | None:
        return None  # one backward of the summed loss: FSDP reduce-scatters it

    def backward(self, losses: Sequence[torch.Tensor], record: ForwardRecord | None = None) -> None:
        dense_multitask_backward(losses, self.context.model.shared_parameters())


def _equal(options) -> EqualWeighting:
    return EqualWeighting()


METHODS = (Method("stl", "STL", _equal, EqualWeighting, single_task=True),)
WEIGHTINGS = (Component("equal", "EW", _equal, EqualWeighting, plain="mtl", plain_label="MTL"),)
