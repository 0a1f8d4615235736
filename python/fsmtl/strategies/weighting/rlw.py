"""RLW, random loss weighting (Lin et al., TMLR 2022, "Reasonable effectiveness of random
weighting"): the task losses are combined with weights drawn afresh at every step."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ...gradients import ForwardRecord
from ..base import Strategy
from ..method import Component

DISTRIBUTIONS = ("normal", "dirichlet")


class RandomLossWeighting(Strategy):
    """Dense sharing with the loss ``sum_t lambda_t L_t``, ``lambda`` drawn at every step.

    ``distribution="normal"`` (the paper's default): ``lambda = softmax(eps)``, ``eps ~ N(0, I)``,
    drawn by torchjd's ``scalarization.Random`` (torch's global generator). ``"dirichlet"``:
    ``lambda ~ Dir(1, ..., 1)`` (normalised Exp(1) draws from the strategy's generator).
    The weights sum to 1, so the trunk's update has MTL's scale; head ``t`` gets
    ``T lambda_t grad L_t`` (with equal weights, MTL's ``grad L_t``). :attr:`last_weights` holds
    the weights of the latest step.
    """

    def __init__(self, distribution: str = "normal") -> None:
        if distribution not in DISTRIBUTIONS:
            raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
        self.distribution = distribution
        self.last_weights: torch.Tensor | None = None

    def draw(self, losses: torch.Tensor) -> torch.Tensor:
        """Weights ``[T]`` for the stacked losses ``[T]``."""
        if self.distribution == "normal":
            from torchjd.scalarization import Random

            # Random's weights are its output's gradient with respect to the losses.
            probe = losses.detach().clone().requires_grad_(True)
            (weights,) = torch.autograd.grad(Random()(probe), probe)
            return weights
        exp = -torch.log1p(-torch.rand(losses.shape[0], generator=self.context.generator))
        return (exp / exp.sum()).to(losses.device, losses.dtype)

    def backward(self, losses: Sequence[torch.Tensor], record: ForwardRecord | None = None) -> None:
        model = self.context.model
        stacked = torch.stack([loss.reshape(()) for loss in losses])
        weights = self.draw(stacked)
        self.last_weights = weights
        weighted = (weights * stacked).sum()
        torch.autograd.backward(weighted * stacked.shape[0], inputs=self.task_parameters(), retain_graph=True)
        torch.autograd.backward(weighted, inputs=model.shared_parameters())


def _rlw(options) -> RandomLossWeighting:
    return RandomLossWeighting()


WEIGHTINGS = (Component("rlw", "RLW", _rlw, RandomLossWeighting, plain="rlw", requires=("torchjd",)),)
