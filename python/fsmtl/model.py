"""Multi-task model: a shared trunk (theta_sh) and one head per task (paper Eq. 1 and 3)."""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

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
        # The masked submodules whose first call's inputs are recorded as the boundary below
        # the masks (only when trunk parameters stay outside them).
        self._boundary_modules = list(masked_modules or ()) if self.dense_shared_parameters() else []
        self._record = _ForwardRecord()
        self._streamed = False  # inside streamed_forwards()
        #: Record the masked ``nn.Linear`` calls of unmasked forwards (:meth:`linear_record`) for a
        #: masked backward that takes them every step (a sparse strategy sets it when bound);
        #: off by default, since the record keeps the last forward's graph alive until it is taken.
        self.record_linear_calls = False
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
        record = self._record
        handles = []
        if torch.is_grad_enabled():  # forwards under no_grad leave nothing for a backward
            record.trunk_forwards += 1
            record.boundary = ()  # the previous step's, if nobody took it: its graph is freed here
            record.linears = []
        if self._boundary_modules and torch.is_grad_enabled():
            modules = dict(self.trunk.named_modules())
            handles = [modules[n].register_forward_pre_hook(record.see_inputs) for n in self._boundary_modules]
        try:
            if mask is None:
                if self.record_linear_calls and self._masked_linears and torch.is_grad_enabled():
                    modules = dict(self.trunk.named_modules())
                    handles += [
                        modules[n].register_forward_hook(record.linear_hook(i)) for n, i in self._masked_linears
                    ]
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

    def linear_record(self) -> list[tuple[int, torch.Tensor, torch.Tensor, int]]:
        """The masked ``nn.Linear`` calls of the last unmasked trunk forward with grad enabled, for
        the masked backward's fused weight gradient (:func:`fsmtl.masked_multitask_backward`'s
        ``linear_record``): ``(index of the weight in masked_parameters(), input, output, output's
        version counter at the call)``, one entry per call; empty unless
        :attr:`record_linear_calls` is set. Cleared by :meth:`pop_forward_record`."""
        return list(self._record.linears)

    def pop_forward_record(self) -> tuple[tuple[torch.Tensor, ...], int]:
        """What the trunk forwards since the last call leave for the backward, then forget it:
        ``(boundary, trunk_forwards)``. ``boundary`` holds the inputs of the first masked module
        the last forward called (when ``masked_modules`` leaves trunk parameters outside the
        masks; empty otherwise), which lets the masked backward run the layers below the masks
        once (:func:`fsmtl.masked_multitask_backward`'s ``boundary``); ``trunk_forwards`` counts
        the forwards with grad enabled (1: every task's loss shares one trunk graph)."""
        record = self._record
        out = (record.boundary, record.trunk_forwards)
        record.boundary, record.trunk_forwards, record.linears = (), 0, []
        return out

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


class _ForwardRecord:
    """The trunk forwards' record (see :meth:`MultiTaskModel.pop_forward_record`); a deep copy or
    pickle of the model starts with an empty one (the boundary is part of a live graph)."""

    def __init__(self) -> None:
        self.boundary: tuple[torch.Tensor, ...] = ()
        self.trunk_forwards = 0
        self.linears: list[tuple[int, torch.Tensor, torch.Tensor, int]] = []

    def see_inputs(self, module: nn.Module, args: tuple) -> None:
        if not self.boundary:
            self.boundary = tuple(a for a in args if isinstance(a, torch.Tensor) and a.grad_fn is not None)

    def linear_hook(self, index: int):
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            if args and isinstance(args[0], torch.Tensor) and isinstance(out, torch.Tensor):
                self.linears.append((index, args[0].detach(), out, out._version))

        return hook

    def __deepcopy__(self, memo) -> _ForwardRecord:
        return _ForwardRecord()

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()


def count_nonzero_shared(model: nn.Sequential) -> int:
    """Non-zero entries of an exported model's trunk (its first module)."""
    return int(sum(int(torch.count_nonzero(p)) for p in model[0].parameters()))
