"""``fisher_topk`` / ``fisher_topk_batched``: the card's entry point, Fisher from gradients then top-K.

A composition of :func:`~fsmtl_kernels.fisher_accumulate` and
:func:`~fsmtl_kernels.topk_mask_batched` (paper Eq. 10-11); it has no kernel of its own.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import _checks, backends
from .fisher_accumulate import _check_args as _check_fisher_args
from .fisher_accumulate import fisher_accumulate
from .packed_mask import PackedMask, word_layout
from .topk_mask import topk_mask, topk_mask_batched


def fisher_topk(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    k: int | float,
    *,
    backend: str = "auto",
) -> PackedMask:
    """The top-``k`` entries of ``params`` by empirical Fisher information (Eq. 10-11), as a mask.

    Args:
        params: the shared parameters, shapes ``shape_i`` (only their shapes and device are used).
        grads: per-sample ``[N, *shape_i]`` or batch ``shape_i`` gradients, fp16/bf16/fp32.
        k: an int count in ``[0, P]`` or a float keep ratio in ``(0, 1]`` (see :func:`topk_mask`).

    Returns:
        A :class:`PackedMask` with one task and exactly ``k`` ones.
    """
    return _fisher_topk(params, [grads], k, backend, batched=False)


def fisher_topk_batched(
    params: Sequence[torch.Tensor],
    grads: Sequence[Sequence[torch.Tensor]],
    k,
    *,
    backend: str = "auto",
) -> PackedMask:
    """:func:`fisher_topk` for T tasks in one call.

    Args:
        params: the shared parameters, shapes ``shape_i``.
        grads: T lists, one per task, each as ``grads`` of :func:`fisher_topk`.
        k: shared by all tasks, or a list of T counts/ratios.

    Returns:
        A :class:`PackedMask` with T tasks.
    """
    return _fisher_topk(params, grads, k, backend, batched=True)


def _fisher_topk(params, grads, k, backend, *, batched: bool) -> PackedMask:
    params = _checks.tensor_list(params, "params")
    _checks.floating(params, "params", _checks.PARAM_DTYPES)
    if isinstance(grads, torch.Tensor) or not isinstance(grads, Sequence) or not grads:
        raise TypeError("grads must be a non-empty list of per-task gradient lists")
    total = sum(p.numel() for p in params)
    ks = _checks.resolve_ks(k, len(grads), total)
    device = params[0].device
    if backends.select(backend, device).__name__ == "fsmtl_kernels.triton":
        return _fused(params, grads, ks, backend, batched)
    fishers = [torch.zeros(len(grads), *p.shape, dtype=torch.float32, device=p.device) for p in params]
    for t, task_grads in enumerate(grads):
        try:
            fisher_accumulate([f[t] for f in fishers], task_grads, backend=backend)
        except (TypeError, ValueError) as exc:
            name = f"grads[{t}]" if batched else "grads"
            raise type(exc)(f"{name}: {exc}") from None
    if batched:
        return topk_mask_batched(fishers, ks, backend=backend)
    return topk_mask([f[0] for f in fishers], ks[0], backend=backend)


def _fused(params, grads, ks, backend, batched: bool) -> PackedMask:
    """The Triton path: every task's gradients checked first, then the Fisher accumulation with
    the top-K's classifying pass inside it (:mod:`fsmtl_kernels.triton.fisher_topk`)."""
    fishers = [torch.empty(len(grads), *p.shape, dtype=torch.float32, device=p.device) for p in params]
    checked, per_sample = [], []
    for t, task_grads in enumerate(grads):
        try:
            _f, items, _scale, mode = _check_fisher_args([f[t] for f in fishers], task_grads, 1.0)
        except (TypeError, ValueError) as exc:
            name = f"grads[{t}]" if batched else "grads"
            raise type(exc)(f"{name}: {exc}") from None
        checked.append(items)
        per_sample.append(mode)
    shapes = tuple(p.shape for p in params)
    word_offsets, n_words = word_layout([p.numel() for p in params])
    words = backends.select(backend, params[0].device).fisher_topk_forward(fishers, checked, per_sample, ks, n_words)
    return PackedMask(words, shapes)
