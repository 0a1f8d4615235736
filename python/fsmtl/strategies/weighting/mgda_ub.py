"""MGDA-UB (Sener and Koltun, NeurIPS 2018): MGDA on the gradients with respect to the shared
representation, an upper bound of MGDA on the shared parameters that needs one backward per task
through the heads only.

As the authors' code (``MultiObjectiveOptimization``, ``train_multi_task.py``): the representation
gradients are normalised before the min-norm solver (``gradient_normalizers``: ``l2`` by their
norm, ``loss`` by the task's loss, ``loss+`` by both, ``none``; its sample configuration uses
``loss+``), the solver's weights ``a_t`` then scale the raw losses, and one backward of
``sum_t a_t L_t`` updates the whole model, so the trunk gets ``sum_t a_t grad L_t`` and head t
gets ``a_t`` times its task gradient."""

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
    Head t gets ``a_t`` times its task gradient (``heads="weighted"``) or its own gradient.

    The trunk output is recorded by a forward hook on ``model.trunk`` (every output of the step
    when the trainer runs one forward per task; task ``t``'s gradient is then taken with respect
    to all of them). Needs ``pip install torchjd``.

    Args:
        normalization: how each task's representation gradient is divided before the solver:
            ``"loss+"`` (default, the authors' configuration: by the loss times the gradient's
            L2 norm), ``"l2"``, ``"loss"`` or ``"none"``. The trunk update uses the raw gradients.
        heads: ``"weighted"`` (default, the authors' code: head t gets ``a_t`` times its task
            gradient) or ``"unweighted"`` (head t gets its own task gradient).
        epsilon, max_iters: stopping rule of torchjd's MGDA solver.
    """

    def __init__(
        self, normalization: str = "loss+", heads: str = "weighted", epsilon: float = 0.001, max_iters: int = 100
    ) -> None:
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
        if heads not in HEADS:
            raise ValueError(f"heads must be one of {HEADS}, got {heads!r}")
        self.normalization = normalization
        self.heads = heads
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
        rows = []
        for loss in stacked:
            grads = torch.autograd.grad(loss, features, retain_graph=True, allow_unused=True)
            rows.append(
                torch.cat([(g if g is not None else torch.zeros_like(z)).flatten() for g, z in zip(grads, features)])
            )
        jacobian = torch.stack(rows)
        normalized = jacobian / gradient_normalizers(jacobian, stacked.detach(), self.normalization).unsqueeze(1)
        self.last_weights = self.aggregator.gramian_weighting(normalized @ normalized.T)
        head_weights = self.last_weights.detach() if self.heads == "weighted" else torch.ones_like(stacked)
        torch.autograd.backward((head_weights * stacked).sum(), inputs=self.task_parameters(), retain_graph=True)
        combined = self.last_weights @ jacobian
        pieces = torch.split(combined, [z.numel() for z in features])
        torch.autograd.backward(
            features, [p.view_as(z) for p, z in zip(pieces, features)], inputs=model.shared_parameters()
        )


#: Normalisations of the representation gradients before the solver, as the authors' code names them.
NORMALIZATIONS = ("loss+", "l2", "loss", "none")
HEADS = ("weighted", "unweighted")


def gradient_normalizers(jacobian: torch.Tensor, losses: torch.Tensor, normalization: str) -> torch.Tensor:
    """The divisor of each task's gradient row ``[T]`` (1 where it would be 0)."""
    if normalization == "none":
        out = torch.ones_like(losses)
    elif normalization == "loss":
        out = losses.clone()
    else:
        out = jacobian.norm(dim=1)
        if normalization == "loss+":
            out = out * losses
    return torch.where(out > 0, out, torch.ones_like(out)).to(jacobian.dtype)


def _mgda_ub(options) -> MGDAUB:
    return MGDAUB()


WEIGHTINGS = (Component("mgda-ub", "MGDA-UB", _mgda_ub, MGDAUB, plain="mgda-ub", requires=("torchjd",)),)
