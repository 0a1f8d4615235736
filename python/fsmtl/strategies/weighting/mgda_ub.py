"""MGDA-UB (Sener and Koltun, NeurIPS 2018): MGDA on the gradients with respect to the shared
representation, an upper bound of MGDA on the shared parameters that needs one backward per task
through the heads only."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ...gradients import ForwardRecord
from ..base import Strategy, TrainingContext
from ..method import Component


class MGDAUB(Strategy):
    """Dense sharing; the trunk gets ``sum_t a_t grad L_t`` with ``a`` the min-norm point of the
    convex hull of the representation gradients ``grad_Z L_t`` (``Z``: the trunk's output), found
    by the weighting of torchjd's MGDA aggregator on the Gramian of the Jacobian ``[T, |Z|]``
    (kept in :attr:`last_weights`). One backward through ``Z`` follows.
    Heads get their own task gradient.

    The trunk output is recorded by a forward hook on ``model.trunk`` (every output of the step
    when the trainer runs one forward per task; task ``t``'s gradient is then taken with respect
    to all of them). Needs ``pip install torchjd``.

    Args:
        epsilon, max_iters: stopping rule of torchjd's MGDA solver.
    """

    def __init__(self, epsilon: float = 0.001, max_iters: int = 100) -> None:
        self.epsilon = epsilon
        self.max_iters = max_iters
        self._features: list[torch.Tensor] = []
        self._hook = None
        self.last_weights: torch.Tensor | None = None

    def bind(self, context: TrainingContext) -> None:
        from torchjd.aggregation import MGDA

        super().bind(context)
        self.aggregator = MGDA(epsilon=self.epsilon, max_iters=self.max_iters)
        if self._hook is not None:
            self._hook.remove()
        self._hook = context.model.trunk.register_forward_hook(self._record)

    def _record(self, module, inputs, output) -> None:
        if torch.is_grad_enabled() and output.requires_grad:
            self._features.append(output)

    def backward(self, losses: Sequence[torch.Tensor], record: ForwardRecord | None = None) -> None:
        features, self._features = self._features, []
        if not features:
            raise RuntimeError("MGDA-UB saw no trunk output with a gradient during this step's forward")
        model = self.context.model
        stacked = torch.stack([loss.reshape(()) for loss in losses])
        torch.autograd.backward(stacked.sum(), inputs=self.task_parameters(), retain_graph=True)
        rows = []
        for loss in stacked:
            grads = torch.autograd.grad(loss, features, retain_graph=True, allow_unused=True)
            rows.append(
                torch.cat([(g if g is not None else torch.zeros_like(z)).flatten() for g, z in zip(grads, features)])
            )
        jacobian = torch.stack(rows)
        self.last_weights = self.aggregator.gramian_weighting(jacobian @ jacobian.T)
        combined = self.last_weights @ jacobian
        pieces = torch.split(combined, [z.numel() for z in features])
        torch.autograd.backward(
            features, [p.view_as(z) for p, z in zip(pieces, features)], inputs=model.shared_parameters()
        )


def _mgda_ub(options) -> MGDAUB:
    return MGDAUB()


WEIGHTINGS = (Component("mgda-ub", "MGDA-UB", _mgda_ub, MGDAUB, plain="mgda-ub", requires=("torchjd",)),)
