"""Masked multi-task gradient average (paper Eq. 4 and the shared update of Eq. 12)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import _checks, backends
from .mask import PackedMask

#: ``normalize`` modes of :func:`masked_grad_average`.
NORMALIZE_MODES = ("tasks", "selected")


def masked_grad_average(
    grads: Sequence[torch.Tensor],
    mask: PackedMask,
    *,
    normalize: str = "tasks",
    params: Sequence[torch.Tensor] | None = None,
    backend: str = "auto",
) -> list[torch.Tensor]:
    """Average T per-task gradients, each masked by its task's mask.

    ``normalize="tasks"``: ``sum_t S_t * g_t / T`` (the paper's average of all task gradients).
    ``normalize="selected"``: ``sum_t S_t * g_t / sum_t S_t``, 0 where no task selected the entry.

    Args:
        grads: tensors ``[T, *shape_i]`` (fp16/bf16/fp32), one per parameter; row ``t`` is task
            ``t``'s gradient. Summed in float32.
        mask: a :class:`PackedMask` with T tasks over parameters of shapes ``shape_i``.
        normalize: ``"tasks"`` or ``"selected"``.
        params: when given, the result is written into each parameter's ``.grad`` (allocated
            when None, overwritten otherwise) in the parameter's dtype.
        backend: ``"auto" | "reference" | "triton" | "cpp"``.

    Returns:
        The averaged gradients, shapes ``shape_i``: the parameters' ``.grad`` tensors when
        ``params`` is given, else new tensors in the dtype of ``grads``.
    """
    items = _checks.tensor_list(grads, "grads", min_dim=1)
    _checks.floating(items, "grads")
    if not isinstance(mask, PackedMask):
        raise TypeError(f"mask must be a PackedMask, got {type(mask).__name__}")
    if not isinstance(normalize, str) or normalize not in NORMALIZE_MODES:
        raise ValueError(f"normalize={normalize!r} is not one of {NORMALIZE_MODES}")
    if len(items) != len(mask.shapes):
        raise ValueError(f"grads has {len(items)} entries but mask covers {len(mask.shapes)} parameters")
    if mask.device != items[0].device:
        raise ValueError(f"mask is on {mask.device} but grads are on {items[0].device}")
    for i, (g, shape) in enumerate(zip(items, mask.shapes)):
        if g.shape != (mask.num_tasks, *shape):
            raise ValueError(f"grads[{i}] has shape {tuple(g.shape)}; expected {(mask.num_tasks, *shape)}")
    if params is not None:
        params = _checks.tensor_list(params, "params")
        _checks.same_length(items, "grads", params, "params")
        _checks.same_device(items, "grads", params, "params")
        _checks.floating(params, "params", (torch.float16, torch.bfloat16, torch.float32, torch.float64))
        for i, (p, shape) in enumerate(zip(params, mask.shapes)):
            if p.shape != shape:
                raise ValueError(f"params[{i}] has shape {tuple(p.shape)}; mask expects {tuple(shape)}")
            if p.grad is not None and (p.grad.shape != p.shape or p.grad.device != p.device):
                raise ValueError(f"params[{i}].grad does not match the parameter's shape and device")
    impl = backends.select(backend, items[0].device)
    if params is None:
        out = [torch.empty(g.shape[1:], dtype=g.dtype, device=g.device) for g in items]
    else:
        for p in params:
            if p.grad is None:
                p.grad = torch.empty_like(p)
        out = [p.grad for p in params]
    impl.masked_grad_average(items, mask, normalize, out)
    return out
