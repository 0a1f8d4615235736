"""SE, attentive single-tasking (Maninis, Radosavovic and Kokkinos, CVPR 2019, "Attentive
single-tasking of multiple tasks"): task-specific squeeze-and-excitation modules modulate the
shared trunk's feature maps."""

from __future__ import annotations

import torch
from torch import nn

from ..method import Component
from .base import ActivationModulation


class SqueezeExcitation(nn.Module):
    """``x * sigmoid(W2 relu(W1 mean(x)))`` over the channels (dim 1) of ``x`` ``[N, C, ...]``."""

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        squeezed = x.mean(tuple(range(2, x.dim()))) if x.dim() > 2 else x
        return torch.sigmoid(self.fc2(torch.relu(self.fc1(squeezed))))


class TaskSqueezeExcitation(ActivationModulation):
    """Task ``t`` rescales every modulation point's channels by its own SE module (Maninis et al.
    put one per task after each residual block of the shared encoder). The shared weights stay
    dense and get the task average; SE module ``(i, t)`` is trained by task ``t``'s loss only.

    The SE parameters belong to the strategy (:attr:`se_modules`, a ``ModuleList`` of ``T`` lists),
    not to the model, so they have their own Adam optimizer (``lr``), stepped right after the
    model's. Its ``fc2`` bias starts at 3 (gates about 0.95) so training starts near the dense
    trunk.

    Args:
        reduction: channel reduction of the SE bottleneck.
        lr: Adam learning rate of the SE parameters.
    """

    def __init__(self, reduction: int = 4, lr: float = 1e-3, points=None) -> None:
        super().__init__(points)
        self.reduction = reduction
        self.lr = lr
        self.se_modules: nn.ModuleList | None = None
        self.optimizer: torch.optim.Optimizer | None = None

    def build(self, channels, num_tasks, device, dtype) -> None:
        self.se_modules = nn.ModuleList(
            nn.ModuleList(SqueezeExcitation(c, self.reduction) for c in channels) for _ in range(num_tasks)
        )
        with torch.no_grad():
            for per_task in self.se_modules:
                for se in per_task:
                    se.fc2.bias.fill_(3.0)
        self.se_modules.to(device=device, dtype=dtype)
        self.optimizer = torch.optim.Adam(self.se_modules.parameters(), lr=self.lr)

    def modulate(self, index, task, output):
        return output * self.expand(self.se_modules[task][index](output), output)

    def parameters(self) -> list[torch.Tensor]:
        return list(self.se_modules.parameters())

    def after_optimizer_step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def own_state(self) -> dict:
        return {"modules": self.se_modules.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_own_state(self, state: dict) -> None:
        self.se_modules.load_state_dict(state["modules"])
        self.optimizer.load_state_dict(state["optimizer"])


def _se(options) -> TaskSqueezeExcitation:
    return TaskSqueezeExcitation()


ARCHITECTURE = Component("se", "SE", _se, TaskSqueezeExcitation, plain="se")
