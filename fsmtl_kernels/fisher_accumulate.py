"""``fisher_accumulate``: squared gradients into float32 Fisher buffers (paper Eq. 10).

The op ``torch.ops.fsmtl.fisher_accumulate`` is defined here once; its kernels are
:func:`fsmtl_kernels.reference.fisher_accumulate` (the semantics), ``csrc/fisher_accumulate.cpp``
(CPU) and :mod:`fsmtl_kernels.triton.fisher_accumulate` (CUDA).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import _checks, backends

torch.library.define(
    "fsmtl::fisher_accumulate", "(Tensor(a!)[] fisher, Tensor[] grads, float scale, bool per_sample) -> ()"
)


@torch.library.register_fake("fsmtl::fisher_accumulate")
def _(fisher, grads, scale, per_sample):
    return None


def _check_args(fisher, grads, scale) -> tuple[list[torch.Tensor], list[torch.Tensor], float, bool]:
    fisher = _checks.tensor_list(fisher, "fisher")
    grads = _checks.tensor_list(grads, "grads")
    _checks.same_length(fisher, "fisher", grads, "grads")
    _checks.same_device(fisher, "fisher", grads, "grads")
    _checks.floating(fisher, "fisher", _checks.FISHER_DTYPES)
    _checks.floating(grads, "grads")
    scale = _checks.check_scale(scale)
    per_sample = grads[0].dim() == fisher[0].dim() + 1
    n = grads[0].shape[0] if per_sample else None
    for i, (f, g) in enumerate(zip(fisher, grads)):
        if per_sample:
            if g.dim() != f.dim() + 1 or g.shape[1:] != f.shape:
                raise ValueError(
                    f"grads[{i}] has shape {tuple(g.shape)}; per-sample gradients (as grads[0]) must be "
                    f"[N, *{tuple(f.shape)}] matching fisher[{i}]"
                )
            if g.shape[0] != n:
                raise ValueError(f"grads[{i}] has {g.shape[0]} samples but grads[0] has {n}")
        elif g.shape != f.shape:
            raise ValueError(
                f"grads[{i}] has shape {tuple(g.shape)}; batch gradients (as grads[0]) must match "
                f"fisher[{i}] {tuple(f.shape)}"
            )
    return fisher, grads, scale, per_sample


def fisher_accumulate(
    fisher: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    *,
    scale: float = 1.0,
    backend: str = "auto",
) -> list[torch.Tensor]:
    """Accumulate squared gradients into float32 Fisher buffers, over all parameters in one call.

    Args:
        fisher: float32 tensors ``shape_i``, one per parameter; updated in place (any strides).
        grads: per-sample gradients ``[N, *shape_i]`` (``F_i += scale * sum_n g_in**2``) or batch
            gradients ``shape_i`` (``F_i += scale * g_i**2``); fp16, bf16 or fp32, upcast to
            float32 before squaring. The mode is read from ``grads[0]`` and must hold for all.
        scale: a finite real number multiplying the squares, e.g. ``1 / N`` for the empirical
            mean of Eq. 10.
        backend: ``"auto" | "reference" | "triton" | "cpp"``.

    Returns:
        ``fisher`` (the same tensors).
    """
    fisher, grads, scale, per_sample = _check_args(fisher, grads, scale)
    backends.kernel("fisher_accumulate", backend, fisher[0].device)(fisher, grads, scale, per_sample)
    return fisher
