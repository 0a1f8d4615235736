"""Weightings through torchjd: the trunk's Jacobian (one row per task) is reduced
by an aggregator (MGDA, PCGrad, CAGrad, Nash-MTL, random weights, ...) instead of averaged."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from functools import partial
from typing import NamedTuple

import torch

from ...gradients import ForwardRecord
from ..base import Strategy
from ..method import Component


class Aggregator(NamedTuple):
    """A torchjd aggregator: its class in ``torchjd.aggregation``, keyword arguments (None means
    the number of tasks), table label, and the solver packages it needs besides torchjd."""

    torchjd_class: str
    kwargs: Mapping[str, object]
    label: str
    requires: tuple[str, ...] = ()


# The solvers are torchjd's optional dependencies ("torchjd[full]"), named as find_spec sees them.
_QUADPROG = ("qpsolvers", "quadprog")
AGGREGATORS: dict[str, Aggregator] = {
    "mgda": Aggregator("MGDA", {}, "MGDA"),
    "pcgrad": Aggregator("PCGrad", {}, "PCGrad"),
    "cagrad": Aggregator("CAGrad", {"c": 0.4}, "CAGrad", ("cvxpy", "clarabel")),
    "nashmtl": Aggregator("NashMTL", {"n_tasks": None}, "Nash-MTL", ("cvxpy", "ecos")),
    "rgw": Aggregator("Random", {}, "RGW"),
    "upgrad": Aggregator("UPGrad", {}, "UPGrad", _QUADPROG),
    "imtlg": Aggregator("IMTLG", {}, "IMTL-G"),
    "dualproj": Aggregator("DualProj", {}, "DualProj", _QUADPROG),
    "alignedmtl": Aggregator("AlignedMTL", {}, "Aligned-MTL"),
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
        self._built = None

    def _build(self, num_tasks: int):
        if not isinstance(self.aggregator, str):
            return self.aggregator
        try:
            import torchjd.aggregation as agg
        except ImportError as exc:
            raise ImportError("JacobianAggregation needs torchjd: pip install torchjd") from exc
        spec = AGGREGATORS[self.aggregator]
        kwargs = {k: (num_tasks if v is None else v) for k, v in spec.kwargs.items()}
        return getattr(agg, spec.torchjd_class)(**kwargs)

    def state_dict(self) -> dict:
        # Some aggregators keep state across steps (Nash-MTL's step counter and last weights):
        # a copy of the whole built aggregator goes into the checkpoint (pickled by torch.save).
        return {"aggregator": copy.deepcopy(self._built)}

    def load_state_dict(self, state: dict) -> None:
        self._built = copy.deepcopy(state["aggregator"])

    def backward(self, losses: Sequence[torch.Tensor], record: ForwardRecord | None = None) -> None:
        from torchjd.autojac import backward, jac_to_grad

        if self._built is None:
            self._built = self._build(len(losses))
        model = self.context.model
        shared = model.shared_parameters()
        stacked = torch.stack([loss.reshape(()) for loss in losses])
        torch.autograd.backward(stacked.sum(), inputs=self.task_parameters(), retain_graph=True)
        backward(list(stacked), inputs=shared)
        jac_to_grad(shared, self._built)


def _jacobian(name: str, options) -> JacobianAggregation:
    return JacobianAggregation(name)


WEIGHTINGS = tuple(
    Component(
        name, a.label, partial(_jacobian, name), JacobianAggregation, plain=name, requires=("torchjd", *a.requires)
    )
    for name, a in AGGREGATORS.items()
)
