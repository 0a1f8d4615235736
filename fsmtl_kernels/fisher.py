"""Fisher accumulation and the card's entry point ``fisher_topk``."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import _checks, backends
from .mask import PackedMask
from .topk import topk_mask, topk_mask_batched


def _check_fisher_args(fisher, grads, scale) -> tuple[list[torch.Tensor], list[torch.Tensor], bool]:
    fisher = _checks.tensor_list(fisher, "fisher")
    grads = _checks.tensor_list(grads, "grads")
    _checks.same_length(fisher, "fisher", grads, "grads")
    _checks.same_device(fisher, "fisher", grads, "grads")
    _checks.floating(fisher, "fisher", (torch.float32,))
    _checks.floating(grads, "grads")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a real number, got {type(scale).__name__}")
    if scale != scale or scale in (float("inf"), float("-inf")):
        raise ValueError(f"scale must be finite, got {scale}")
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
    return fisher, grads, per_sample


def fisher_accumulate(
    fisher: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    *,
    scale: float = 1.0,
    backend: str = "auto",
) -> list[torch.Tensor]:
    """Accumulate squared gradients into float32 Fisher buffers, over all parameters in one call.

    Args:
        fisher: float32 tensors ``shape_i``, one per parameter; updated in place.
        grads: per-sample gradients ``[N, *shape_i]`` (``F_i += scale * sum_n g_in**2``) or batch
            gradients ``shape_i`` (``F_i += scale * g_i**2``); fp16, bf16 or fp32, upcast to
            float32 before squaring. The mode is read from ``grads[0]`` and must hold for all.
        scale: multiplies the squares, e.g. ``1 / N`` for the empirical mean of Eq. 10.
        backend: ``"auto" | "reference" | "triton" | "cpp"``.

    Returns:
        ``fisher`` (the same tensors).
    """
    fisher, grads, per_sample = _check_fisher_args(fisher, grads, scale)
    backends.select(backend, fisher[0].device).fisher_accumulate(fisher, grads, float(scale), per_sample)
    return fisher


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
    _checks.floating(params, "params", (torch.float16, torch.bfloat16, torch.float32, torch.float64))
    if isinstance(grads, torch.Tensor) or not isinstance(grads, Sequence) or not grads:
        raise TypeError("grads must be a non-empty list of per-task gradient lists")
    total = sum(p.numel() for p in params)
    ks = _checks.resolve_ks(k, len(grads), total)
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


def linear_fisher(
    grad_output: torch.Tensor,
    inputs: torch.Tensor,
    weight_fisher: torch.Tensor,
    bias_fisher: torch.Tensor | None = None,
    *,
    scale: float = 1.0,
    backend: str = "auto",
) -> None:
    """Fisher of a Linear layer from one batched backward: no per-sample gradients are formed.

    ``weight_fisher += scale * (g*g)^T (a*a)`` and ``bias_fisher += scale * sum_n g_n**2``, which
    equal the sums of squared per-sample gradients ``g_n a_n^T`` and ``g_n``.

    Args:
        grad_output: ``[N, out]`` gradients of the loss w.r.t. the layer's output (fp16/bf16/fp32).
        inputs: ``[N, in]`` the layer's inputs, same device.
        weight_fisher: float32 ``[out, in]``, updated in place.
        bias_fisher: float32 ``[out]`` or None, updated in place.
        scale: multiplies the sums.
        backend: ``"auto" | "reference" | "triton" | "cpp"``.
    """
    for name, t in (("grad_output", grad_output), ("inputs", inputs), ("weight_fisher", weight_fisher)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    _checks.floating([grad_output], "grad_output")
    _checks.floating([inputs], "inputs")
    _checks.floating([weight_fisher], "weight_fisher", (torch.float32,))
    if grad_output.dim() != 2 or inputs.dim() != 2 or grad_output.shape[0] != inputs.shape[0]:
        raise ValueError(
            f"grad_output {tuple(grad_output.shape)} and inputs {tuple(inputs.shape)} must be [N, out] and [N, in]"
        )
    if weight_fisher.shape != (grad_output.shape[1], inputs.shape[1]):
        raise ValueError(
            f"weight_fisher has shape {tuple(weight_fisher.shape)}; expected {(grad_output.shape[1], inputs.shape[1])}"
        )
    tensors = [grad_output, inputs, weight_fisher]
    if bias_fisher is not None:
        if not isinstance(bias_fisher, torch.Tensor):
            raise TypeError(f"bias_fisher must be a torch.Tensor or None, got {type(bias_fisher).__name__}")
        _checks.floating([bias_fisher], "bias_fisher", (torch.float32,))
        if bias_fisher.shape != (grad_output.shape[1],):
            raise ValueError(f"bias_fisher has shape {tuple(bias_fisher.shape)}; expected {(grad_output.shape[1],)}")
        tensors.append(bias_fisher)
    for name, t in zip(("grad_output", "inputs", "weight_fisher", "bias_fisher"), tensors):
        if t.device != grad_output.device:
            raise ValueError(f"{name} is on {t.device} but grad_output is on {grad_output.device}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale != scale:
        raise TypeError(f"scale must be a real number, got {scale!r}")
    impl = backends.select(backend, grad_output.device)
    impl.linear_fisher(grad_output, inputs, weight_fisher, bias_fisher, float(scale))
