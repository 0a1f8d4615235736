"""Multi-task model: a shared trunk (theta_sh) and one head per task (paper Eq. 1 and 3)."""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from torch.func import functional_call

from .gradients import ForwardRecord


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
        # The masked submodules whose first call's inputs are recorded as the boundary below
        # the masks (only when trunk parameters stay outside them).
        self._boundary_modules = list(masked_modules or ()) if self.dense_shared_parameters() else []
        self._streamed = False  # inside streamed_forwards()
        # Masked nn.Linear modules: (module name, index of its weight in masked_parameters()).
        index = {n: i for i, n in enumerate(self._masked_names)}
        self._masked_linears = [
            (n, index[f"{n}.weight"]) for n, m in names.items() if isinstance(m, nn.Linear) and f"{n}.weight" in index
        ]

    @property
    def num_tasks(self) -> int:
        return len(self.heads)

    def shared_parameters(self) -> list[nn.Parameter]:
        """All trainable trunk parameters."""
        return [p for p in self.trunk.parameters() if p.requires_grad]

    def masked_parameter_names(self) -> list[str]:
        """The names (in ``trunk.named_parameters()``) of :meth:`masked_parameters`, in their order."""
        return list(self._masked_names)

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

    def features(
        self, x: torch.Tensor, mask: Sequence[torch.Tensor] | None = None, *, record: ForwardRecord | None = None
    ) -> torch.Tensor:
        """Trunk features; with ``mask`` (bool tensors shaped like :meth:`masked_parameters`) the
        trunk runs on ``mask * theta_sh``: entries outside the mask act as 0 and get a zero gradient.
        With ``record`` (a :class:`fsmtl.ForwardRecord`) a forward with grad enabled leaves in it
        what the step's masked backward can use (see :func:`fsmtl.masked_multitask_backward`)."""
        handles = []
        if record is not None and torch.is_grad_enabled():  # forwards under no_grad leave nothing
            record.start_forward()
            linears = self._masked_linears if mask is None and record.linear_calls else []
            if self._boundary_modules or linears:
                modules = dict(self.trunk.named_modules())
                handles = [modules[n].register_forward_pre_hook(record.see_inputs) for n in self._boundary_modules]
                handles += [modules[n].register_forward_hook(record.linear_hook(i)) for n, i in linears]
        try:
            if mask is None:
                return self.trunk(x)
            # p * m with the bool mask (no float mask is kept: the product saves the bool tensor,
            # and the cast inside the op is transient): the gradient is the incoming one inside
            # the mask and 0 outside. torch.where(m, p, 0) gives the same up to the sign of 0 but
            # took 1.44 ms against 0.42 ms for a 512x512 weight (one thread, torch 2.13 CPU).
            overrides = {n: p * m for n, p, m in zip(self._masked_names, self.masked_parameters(), mask)}
            if not torch.is_grad_enabled() or self._streamed:
                return functional_call(self.trunk, overrides, (x,))
            # The layers save their (masked) weights for the backward: T task forwards would hold T
            # masked copies of theta_sh. Saved as (parameter, bool mask) instead and recomputed by
            # the backward, so each copy lives only during its own forward (streamed_forwards()
            # skips this: there one graph is alive at a time).
            sources = {
                w.untyped_storage().data_ptr(): (p, m)
                for w, p, m in zip(overrides.values(), self.masked_parameters(), mask)
            }
            with torch.autograd.graph.saved_tensors_hooks(_SavedMasked(sources).pack, _SavedMasked.unpack):
                return functional_call(self.trunk, overrides, (x,))
        finally:
            for h in handles:
                h.remove()

    @contextmanager
    def streamed_forwards(self) -> Iterator[None]:
        """Inside, each masked forward's graph is backwarded before the next forward runs (as
        :class:`fsmtl.MaskedBackwardStream` does): a masked forward then keeps its masked weights
        for its backward, one copy of the masked parameters alive, instead of saving (parameter,
        mask) and rebuilding ``p * m`` in the backward for every layer and task."""
        previous, self._streamed = self._streamed, True
        try:
            yield
        finally:
            self._streamed = previous

    def forward(
        self,
        x: torch.Tensor,
        task: int,
        mask: Sequence[torch.Tensor] | None = None,
        *,
        record: ForwardRecord | None = None,
    ) -> torch.Tensor:
        """Task ``task``'s output ``head_t(trunk(x))``; ``mask`` and ``record`` as in :meth:`features`."""
        previous, self.current_task = self.current_task, task
        try:
            return self.heads[task](self.features(x, mask, record=record))
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


class _SavedMasked:
    """Saved-tensor hooks of a masked forward: a tensor that shares storage with a masked weight
    ``p * m`` is saved as ``(p, m, size, stride, offset)`` and rebuilt on unpack (same
    values: ``p`` does not change between a forward and its backward)."""

    def __init__(self, sources: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.sources = sources

    def pack(self, t: torch.Tensor):
        if t.layout == torch.strided and t.device.type != "meta":
            hit = self.sources.get(t.untyped_storage().data_ptr())
            if hit is not None:
                return (_SavedMasked, hit[0], hit[1], t.size(), t.stride(), t.storage_offset())
        return t

    @staticmethod
    def unpack(saved):
        if isinstance(saved, tuple) and saved[0] is _SavedMasked:
            _, p, m, size, stride, offset = saved
            return (p.detach() * m).as_strided(size, stride, offset)
        return saved


def count_nonzero_shared(model: nn.Sequential) -> int:
    """Non-zero entries of an exported model's trunk (its first module)."""
    return int(sum(int(torch.count_nonzero(p)) for p in model[0].parameters()))
