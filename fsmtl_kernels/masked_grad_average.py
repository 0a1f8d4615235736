"""``masked_grad_average``: the masked multi-task gradient average (paper Eq. 4, Eq. 12).

The op ``torch.ops.fsmtl.masked_grad_average`` is defined here once; its kernels are
``csrc/masked_grad_average.cpp`` (CPU) and :mod:`fsmtl_kernels.triton.masked_grad_average`
(CUDA). Both read the mask's words at the ``word_offsets`` the :class:`PackedMask` computed.
The reference, :func:`fsmtl_kernels.reference.masked_grad_average`, reads the mask's cached
unpacked bool tensors instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import _checks, backends, reference
from .packed_mask import PackedMask

#: ``normalize`` modes of :func:`masked_grad_average`.
NORMALIZE_MODES = ("tasks", "selected")

torch.library.define(
    "fsmtl::masked_grad_average",
    "(Tensor[] grads, Tensor words, int[] word_offsets, str normalize, Tensor(a!)[] out) -> ()",
)


@torch.library.register_fake("fsmtl::masked_grad_average")
def _(grads, words, word_offsets, normalize, out):
    return None


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
        normalize: one of :data:`NORMALIZE_MODES`, ``"tasks"`` or ``"selected"``.
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
        _checks.floating(params, "params", _checks.PARAM_DTYPES)
        for i, (p, shape) in enumerate(zip(params, mask.shapes)):
            if p.shape != shape:
                raise ValueError(f"params[{i}] has shape {tuple(p.shape)}; mask expects {tuple(shape)}")
            if p.grad is not None and (p.grad.shape != p.shape or p.grad.device != p.device):
                raise ValueError(f"params[{i}].grad does not match the parameter's shape and device")
    device = items[0].device
    use_reference = backends.select(backend, device) is reference
    if params is None:
        out = [torch.empty(g.shape[1:], dtype=g.dtype, device=g.device) for g in items]
    else:
        for p in params:
            if p.grad is None:
                p.grad = torch.empty_like(p)
        out = [p.grad for p in params]
    if use_reference:
        reference.masked_grad_average(items, mask.to_bool_stacked(), normalize, out)
    else:
        run = backends.kernel("masked_grad_average", backend, device)
        run(items, mask.words, mask.word_offsets, normalize, out)
    return out
