"""Multi-task model: a shared trunk (theta_sh) and one head per task (paper Eq. 1 and 3)."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call

import fsmtl_kernels as fk

from .files import atomic_write_bytes
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
        # A copy of the unsharded model on the meta device, kept by shard() so that full_copy()
        # can rebuild plain modules from the gathered weights; None while the model is not sharded.
        self._template: MultiTaskModel | None = None
        # Masked nn.Linear modules: (module name, index of its weight in masked_parameters()).
        index = {n: i for i, n in enumerate(self._masked_names)}
        self._masked_linears = [
            (n, index[f"{n}.weight"]) for n, m in names.items() if isinstance(m, nn.Linear) and f"{n}.weight" in index
        ]

    # ----------------------------------------------------------------------------- sharding (FSDP2)

    def shard(self, units=None, *, mp_policy=None, mesh=None) -> MultiTaskModel:
        """Shard the model's parameters over the ranks of the process group with FSDP2
        (``torch.distributed.fsdp.fully_shard``): every unit of ``units`` (default
        :meth:`fsdp_units`) is one FSDP group, the model itself the root. Call it before the
        optimizer is built (its parameters become ``DTensor`` shards); returns the model.

        Args:
            units: a function ``units(model) -> list of submodules`` (a wrapping policy), or None.
            mp_policy: a ``torch.distributed.fsdp.MixedPrecisionPolicy`` (bf16 or fp16 compute).
            mesh: the device mesh (default: one dimension over every rank of the default group).
        """
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

        if self._template is not None:
            raise ValueError("the model is already sharded")
        template = copy.deepcopy(self).to("meta")
        modules = units(self) if units is not None else self.fsdp_units()
        kwargs = {k: v for k, v in (("mp_policy", mp_policy), ("mesh", mesh)) if v is not None}
        for module in modules:
            fully_shard(module, **kwargs)
        fully_shard(self, **kwargs)
        register_fsdp_forward_method(self, "features")  # features() is a forward of the root too
        object.__setattr__(self, "_template", template)  # not a submodule: no parameters, no state_dict entry
        return self

    def fsdp_units(self) -> list[nn.Module]:
        """The default FSDP groups of :meth:`shard`: the trunk's ``fsdp_units`` when the trunk names
        them (the built-in backbones: each block), else each direct child of the trunk that holds
        parameters; and each head."""
        names = getattr(self.trunk, "fsdp_units", None)
        modules = dict(self.trunk.named_modules())
        if names is not None:
            trunk_units = [modules[n] for n in names]
        else:
            trunk_units = [m for m in self.trunk.children() if any(True for _ in m.parameters())]
        return trunk_units + list(self.heads)

    @property
    def is_sharded(self) -> bool:
        """True after :meth:`shard`: the parameters are ``DTensor`` shards."""
        return self._template is not None

    def full_copy(self) -> MultiTaskModel:
        """A plain (unsharded) copy with every parameter and buffer in full, on the parameters'
        device: of a sharded model, gathered from every rank (a collective: call it on every rank)."""
        if self._template is None:
            return copy.deepcopy(self)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self, options=StateDictOptions(full_state_dict=True))
        device = next(iter(full.values())).device
        plain = copy.deepcopy(self._template).to_empty(device=device)
        plain.load_state_dict(full)
        return plain.train(self.training)

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
            if self._template is not None:  # sharded: the unsharded parameters the forward uses
                handles += [
                    m.register_forward_pre_hook(record.unsharded_hook(f"{n}." if n else ""))
                    for n, m in self.trunk.named_modules()
                    if any(True for _ in m.parameters(recurse=False))
                ]
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

    def _task_mask(self, task: int, mask) -> list[torch.Tensor] | None:
        """Task ``task``'s bool masks from ``mask``: None, a :class:`fsmtl_kernels.PackedMask` of
        every task (as :func:`fsmtl.compute_masks` and the strategies return), or the task's own bool
        tensors shaped like :meth:`masked_parameters`."""
        if isinstance(task, bool) or not isinstance(task, int) or not 0 <= task < self.num_tasks:
            raise ValueError(f"task must be an int in [0, {self.num_tasks}), got {task!r}")
        if mask is None:
            return None
        shapes = [tuple(p.shape) for p in self.masked_parameters()]
        if isinstance(mask, fk.PackedMask):
            if [tuple(s) for s in mask.shapes] != shapes or mask.num_tasks != self.num_tasks:
                raise ValueError(
                    f"mask covers {mask.num_tasks} task(s) over shapes {[tuple(s) for s in mask.shapes]}; this model "
                    f"has {self.num_tasks} tasks over masked parameters of shapes {shapes}"
                )
            return mask.to_bool(task)
        mask = list(mask)
        if [tuple(m.shape) for m in mask] != shapes or any(m.dtype != torch.bool for m in mask):
            raise ValueError(f"mask must hold one bool tensor per masked parameter, of shapes {shapes}")
        return mask

    def export_task(self, task: int, mask=None) -> nn.Sequential:
        """Task ``task``'s inference model ``head_t(trunk(x; S_t * theta_sh))``: a plain
        ``nn.Sequential(trunk, head)`` in eval mode with the mask baked in (entries outside it set
        to 0), whose outputs equal ``model(x, task, mask)``'s. ``mask``: None (the dense trunk), a
        :class:`fsmtl_kernels.PackedMask` of every task, or task ``task``'s bool tensors."""
        bools = self._task_mask(task, mask)
        # A sharded model is gathered first (a collective: every rank calls export_task).
        source = self.full_copy() if self.is_sharded else self
        trunk = copy.deepcopy(source.trunk)
        if bools is not None:
            params = dict(trunk.named_parameters())
            with torch.no_grad():
                for n, m in zip(self._masked_names, bools):
                    params[n].masked_fill_(~m, 0.0)
        return nn.Sequential(trunk, copy.deepcopy(source.heads[task])).eval()

    def save_task_models(self, directory, mask=None, *, names: Sequence[str] | None = None) -> Path:
        """One inference model per task (:meth:`export_task`) in ``directory``: ``<name>.pt``
        (``torch.save`` of the module; load with ``torch.load(path, weights_only=False)``), and
        ``sparsity.json`` stating per task the non-zero entries of its trunk, the trunk's size and
        the masked entries its mask keeps. ``names`` (default ``task0``, ``task1``, ...) name the
        files. Returns ``directory``."""
        names = list(names) if names is not None else [f"task{t}" for t in range(self.num_tasks)]
        if len(names) != self.num_tasks or len(set(names)) != len(names):
            raise ValueError(f"names must be {self.num_tasks} distinct task names, got {names}")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        trunk_size = sum(p.numel() for p in self.trunk.parameters())
        masked_size = sum(p.numel() for p in self.masked_parameters())
        sparsity = {}
        for t, name in enumerate(names):
            exported = self.export_task(t, mask)
            kept = masked_size if mask is None else int(sum(int(m.sum()) for m in self._task_mask(t, mask)))
            sparsity[name] = {
                "trunk_nonzero": count_nonzero_shared(exported),
                "trunk_entries": trunk_size,
                "masked_entries": masked_size,
                "mask_kept": kept,
            }
            atomic_write_bytes(directory / f"{name}.pt", lambda f, m=exported: torch.save(m, f))
        atomic_write_bytes(directory / "sparsity.json", lambda f: f.write(json.dumps(sparsity, indent=1).encode()))
        return directory

    @torch.no_grad()
    def predict(
        self, x: torch.Tensor, tasks: Sequence[int] | None = None, *, mask=None, batch_size: int = 1024
    ) -> list[torch.Tensor]:
        """Head outputs of ``tasks`` (indices, default every task) on inputs ``x`` ``[N, ...]``, in
        eval mode without gradients, ``batch_size`` samples at a time; task t's forward runs under
        its mask when ``mask`` is given (a :class:`fsmtl_kernels.PackedMask` of every task, as a
        ``mask_forward`` run trains). The model's train/eval mode is restored afterwards."""
        if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[0] == 0:
            raise ValueError(f"x must be a tensor of inputs [N, ...] with N >= 1, got {getattr(x, 'shape', x)!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        tasks = list(range(self.num_tasks)) if tasks is None else list(tasks)
        masks = {t: self._task_mask(t, mask) for t in tasks}
        device = next(self.parameters()).device
        was_training = self.training
        self.eval()
        try:
            outs = {t: [] for t in tasks}
            for start in range(0, x.shape[0], batch_size):
                chunk = x[start : start + batch_size].to(device)
                if chunk.dtype == torch.uint8:  # images in [0, 255], as the Trainer reads them
                    chunk = chunk.float().div_(255)
                if mask is None and not self._modulated():
                    features = self.features(chunk)
                    for t in tasks:
                        outs[t].append(self.heads[t](features))
                else:
                    for t in tasks:
                        outs[t].append(self(chunk, t, masks[t]))
            return [torch.cat(outs[t]) for t in tasks]
        finally:
            self.train(was_training)

    def _modulated(self) -> bool:
        """True when a trunk module has forward hooks: they may read :attr:`current_task` (SE, TR,
        MR modulate the trunk per task), so each task then gets its own forward."""
        return any(m._forward_hooks or m._forward_pre_hooks for m in self.trunk.modules())


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
