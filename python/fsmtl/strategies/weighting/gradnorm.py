"""GradNorm (Chen et al., ICML 2018): learned task weights that balance the gradient norms of the
weighted task losses at the last shared layer."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ...gradients import ForwardRecord, per_task_gradients
from ..base import Strategy, TrainingContext
from ..method import Component


class GradNorm(Strategy):
    """Dense sharing with task weights ``w_t`` learned by GradNorm.

    Each step, with ``W`` the last shared layer's weight, ``G_t = w_t ||grad_W L_t||``,
    ``G_bar = mean_t G_t``, ``r_t = (L_t / L_t(0)) / mean_s (L_s / L_s(0))`` (``L_t(0)``: the loss
    of the first step), the weights take one gradient-descent step of size ``lr`` on
    ``L_grad = sum_t |G_t - G_bar * r_t ** alpha|`` (the target ``G_bar * r_t ** alpha`` held
    constant, as in the paper), then are renormalised to ``sum_t w_t = T``. The network update
    uses the weights before this step: the trunk gets ``1/T sum_t w_t grad L_t`` (so with every
    ``w_t = 1`` this is MTL) and head ``t`` gets ``w_t grad L_t``.

    Args:
        alpha: asymmetry; 0 pulls every task to the same gradient norm, larger values favour
            the tasks that train slowest (Chen et al. use 0.12-1.5; 1.5 is LibMTL's default).
        lr: step size of the plain gradient-descent update of the weights.
        layer: name of the trunk parameter whose gradient norms are balanced (as in
            ``trunk.named_parameters()``); default: the last trunk weight with two or more dims.
    """

    def __init__(self, alpha: float = 1.5, lr: float = 0.025, layer: str | None = None) -> None:
        if not alpha >= 0:
            raise ValueError(f"alpha must be >= 0, got {alpha!r}")
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr!r}")
        self.alpha = float(alpha)
        self.lr = float(lr)
        self.layer = layer
        self.weights: torch.Tensor | None = None
        self.initial_losses: torch.Tensor | None = None

    def bind(self, context: TrainingContext) -> None:
        super().bind(context)
        params = dict(context.model.trunk.named_parameters())
        if self.layer is None:
            candidates = [n for n, p in params.items() if p.requires_grad and p.dim() >= 2]
            if not candidates:
                raise ValueError("GradNorm needs a trunk weight with two or more dims (or pass layer=)")
            self.layer = candidates[-1]
        elif self.layer not in params:
            raise ValueError(f"layer {self.layer!r} is not a trunk parameter; choose one of {list(params)}")
        if self.weights is None:
            device = params[self.layer].device
            self.weights = torch.ones(len(context.tasks), device=device)

    def backward(self, losses: Sequence[torch.Tensor], record: ForwardRecord | None = None) -> None:
        model = self.context.model
        stacked = torch.stack([loss.reshape(()) for loss in losses])
        num_tasks = stacked.shape[0]
        w = self.weights
        layer = dict(model.trunk.named_parameters())[self.layer]
        norms = per_task_gradients(losses, [layer])[0].flatten(1).norm(dim=1).detach()
        weighted = (w * stacked).sum()
        shared = model.shared_parameters()
        torch.autograd.backward(weighted, inputs=self.task_parameters(), retain_graph=True)
        torch.autograd.backward(weighted / num_tasks, inputs=shared)
        self.update_weights(stacked.detach(), norms)

    def state_dict(self) -> dict:
        return {"weights": self.weights, "initial_losses": self.initial_losses}

    def load_state_dict(self, state: dict) -> None:
        self.weights, self.initial_losses = state["weights"], state["initial_losses"]

    @torch.no_grad()
    def update_weights(self, losses: torch.Tensor, norms: torch.Tensor) -> None:
        """One GradNorm step of the weights from the task losses ``[T]`` and the norms
        ``||grad_W L_t||`` ``[T]`` of this step."""
        if self.initial_losses is None:
            self.initial_losses = losses.clone()
        w = self.weights
        g = w * norms
        ratio = losses / self.initial_losses
        target = g.mean() * (ratio / ratio.mean()) ** self.alpha
        # d/dw_t |w_t n_t - target_t| = sign(w_t n_t - target_t) * n_t
        w = w - self.lr * torch.sign(g - target) * norms
        w = w.clamp_min(0.0)
        self.weights = w * (len(w) / w.sum())


def _gradnorm(options) -> GradNorm:
    return GradNorm()


WEIGHTINGS = (Component("gradnorm", "GradNorm", _gradnorm, GradNorm, plain="gradnorm"),)
