"""Multi-task model: a shared trunk (theta_sh) and one head per task (paper Eq. 1 and 3)."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn
from torch.func import functional_call


class MultiTaskModel(nn.Module):
    """``f_t(x) = head_t(trunk(x))``, optionally with task ``t``'s mask on the trunk (Eq. 3).

    Args:
        trunk: the shared feature extractor Phi(x; theta_sh).
        heads: one module per task, mapping trunk features to that task's outputs.
        masked_modules: names of trunk submodules (as in ``trunk.named_modules()``) whose
            parameters the task masks cover; default: every trunk parameter. Trunk parameters
            outside them stay densely shared (their update is the plain task average).
    """

    def __init__(self, trunk: nn.Module, heads: Sequence[nn.Module], masked_modules: Sequence[str] | None = None):
        super().__init__()
        if not isinstance(trunk, nn.Module):
            raise TypeError(f"trunk must be an nn.Module, got {type(trunk).__name__}")
        heads = list(heads)
        if not heads or not all(isinstance(h, nn.Module) for h in heads):
            raise TypeError("heads must be a non-empty sequence of nn.Module")
        self.trunk = trunk
        self.heads = nn.ModuleList(heads)
        #: The task whose forward is running (set by :meth:`forward`, None otherwise): forward hooks
        #: on trunk modules read it to modulate activations per task (SE, task routing, roaming).
        self.current_task: int | None = None
        names = dict(trunk.named_modules())
        if masked_modules is not None:
            unknown = [m for m in masked_modules if m not in names]
            if unknown:
                raise ValueError(f"masked_modules names unknown trunk modules: {unknown}")
            prefixes = tuple(f"{m}." if m else "" for m in masked_modules)
            self._masked_names = [n for n, p in trunk.named_parameters() if p.requires_grad and n.startswith(prefixes)]
        else:
            self._masked_names = [n for n, p in trunk.named_parameters() if p.requires_grad]
        if not self._masked_names:
            raise ValueError("the task masks would cover no trainable trunk parameter")

    @property
    def num_tasks(self) -> int:
        return len(self.heads)

    def shared_parameters(self) -> list[nn.Parameter]:
        """All trainable trunk parameters."""
        return [p for p in self.trunk.parameters() if p.requires_grad]

    def masked_parameters(self) -> list[nn.Parameter]:
        """The trunk parameters the task masks cover, in a fixed order."""
        params = dict(self.trunk.named_parameters())
        return [params[n] for n in self._masked_names]

    def dense_shared_parameters(self) -> list[nn.Parameter]:
        """Trainable trunk parameters outside the masks."""
        masked = set(self._masked_names)
        return [p for n, p in self.trunk.named_parameters() if p.requires_grad and n not in masked]

    def head_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.heads.parameters() if p.requires_grad]

    def features(self, x: torch.Tensor, mask: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """Trunk features; with ``mask`` (bool tensors shaped like :meth:`masked_parameters`) the
        trunk runs on ``mask * theta_sh``: entries outside the mask act as 0 and get a zero gradient."""
        if mask is None:
            return self.trunk(x)
        # where() rather than a float product: no float copy of the mask, and the gradient is the
        # incoming one inside the mask and exactly 0 outside (what p * m gives, up to the sign of 0).
        overrides = {n: torch.where(m, p, 0.0) for n, p, m in zip(self._masked_names, self.masked_parameters(), mask)}
        return functional_call(self.trunk, overrides, (x,))

    def forward(self, x: torch.Tensor, task: int, mask: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        previous, self.current_task = self.current_task, task
        try:
            return self.heads[task](self.features(x, mask))
        finally:
            self.current_task = previous

    def export_task(self, task: int, mask: Sequence[torch.Tensor] | None = None) -> nn.Sequential:
        """Task ``task``'s inference model ``head_t(trunk(x; S_t * theta_sh))`` with the (bool) mask
        baked in."""
        trunk = copy.deepcopy(self.trunk)
        if mask is not None:
            params = dict(trunk.named_parameters())
            with torch.no_grad():
                for n, m in zip(self._masked_names, mask):
                    params[n].masked_fill_(~m, 0.0)
        return nn.Sequential(trunk, copy.deepcopy(self.heads[task])).eval()


def count_nonzero_shared(model: nn.Sequential) -> int:
    """Non-zero entries of an exported model's trunk (its first module)."""
    return int(sum(int(torch.count_nonzero(p)) for p in model[0].parameters()))
