"""Gradient-balancing peers through torchjd: the trunk's Jacobian (one row per task) is reduced
by an aggregator (MGDA, PCGrad, CAGrad, Nash-MTL, random weights, ...) instead of averaged."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..base import Strategy

# name -> (torchjd.aggregation class name, keyword arguments)
AGGREGATORS = {
    "mgda": ("MGDA", {}),
    "pcgrad": ("PCGrad", {}),
    "cagrad": ("CAGrad", {"c": 0.4}),
    "nashmtl": ("NashMTL", {"n_tasks": None}),
    "rgw": ("Random", {}),
    "upgrad": ("UPGrad", {}),
    "imtlg": ("IMTLG", {}),
    "dualproj": ("DualProj", {}),
    "alignedmtl": ("AlignedMTL", {}),
}


class JacobianAggregation(Strategy):
    """Dense sharing with the T task gradients of the trunk combined by a torchjd aggregator.

    Heads get their own task gradient. Needs ``pip install torchjd``; UPGrad and DualProj also
    need its solver extras (``pip install "torchjd[full]"``: quadprog for UPGrad/DualProj, cvxpy for CAGrad/Nash-MTL;
    ``pip install "fsmtl-kernels[peers]"`` installs them).

    Args:
        aggregator: a name from :data:`AGGREGATORS` or a ``torchjd.aggregation.Aggregator``.
    """

    def __init__(self, aggregator="upgrad") -> None:
        if isinstance(aggregator, str) and aggregator not in AGGREGATORS:
            raise ValueError(f"aggregator must be one of {sorted(AGGREGATORS)} or a torchjd Aggregator")
        self.aggregator = aggregator
        self.name = aggregator if isinstance(aggregator, str) else type(aggregator).__name__.lower()
        self._built = None

    def _build(self, num_tasks: int):
        if not isinstance(self.aggregator, str):
            return self.aggregator
        try:
            import torchjd.aggregation as agg
        except ImportError as exc:
            raise ImportError("JacobianAggregation needs torchjd: pip install torchjd") from exc
        cls_name, kwargs = AGGREGATORS[self.aggregator]
        kwargs = {k: (num_tasks if v is None else v) for k, v in kwargs.items()}
        return getattr(agg, cls_name)(**kwargs)

    def backward(self, losses: Sequence[torch.Tensor]) -> None:
        from torchjd.autojac import backward, jac_to_grad

        if self._built is None:
            self._built = self._build(len(losses))
        model = self.context.model
        shared = model.shared_parameters()
        stacked = torch.stack([loss.reshape(()) for loss in losses])
        torch.autograd.backward(stacked.sum(), inputs=model.head_parameters(), retain_graph=True)
        backward(list(stacked), inputs=shared)
        jac_to_grad(shared, self._built)
