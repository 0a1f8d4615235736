"""Per-task gradients of the shared trunk and the masked multi-task backward (paper Eq. 4, 12)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch

import fsmtl_kernels as fk


def per_task_gradients(
    losses: Sequence[torch.Tensor], params: Sequence[torch.Tensor], *, batched: bool = True
) -> list[torch.Tensor]:
    """Gradients of each task loss w.r.t. ``params``: one tensor ``[T, *shape_i]`` per parameter.

    With ``batched=True`` the T vector-Jacobian products run as one batched backward
    (autograd's ``is_grads_batched``); models whose ops have no batching rule fall back to T
    backward passes, with a one-time warning. The graph is kept (``retain_graph=True``).
    """
    losses = list(losses)
    params = list(params)
    num_tasks = len(losses)
    if batched:
        stacked = torch.stack([loss.reshape(()) for loss in losses])
        eye = torch.eye(num_tasks, dtype=stacked.dtype, device=stacked.device)
        try:
            grads = torch.autograd.grad(
                stacked, params, grad_outputs=eye, is_grads_batched=True, retain_graph=True, allow_unused=True
            )
            return [g if g is not None else p.new_zeros((num_tasks, *p.shape)) for g, p in zip(grads, params)]
        except RuntimeError as exc:
            warnings.warn(
                f"batched vector-Jacobian product failed ({exc.__class__.__name__}: {str(exc)[:120]}); "
                "using one backward pass per task",
                RuntimeWarning,
                stacklevel=2,
            )
    out = [p.new_zeros((num_tasks, *p.shape)) for p in params]
    for t, loss in enumerate(losses):
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        for o, g in zip(out, grads):
            if g is not None:
                o[t].copy_(g)
    return out


def masked_multitask_backward(
    losses: Sequence[torch.Tensor],
    masked_params: Sequence[torch.Tensor],
    mask: fk.PackedMask | None,
    *,
    dense_params: Sequence[torch.Tensor] = (),
    head_params: Sequence[torch.Tensor] | None = None,
    normalize: str = "tasks",
    batched: bool = True,
) -> None:
    """Write ``.grad`` for a masked multi-task update.

    ``masked_params`` get ``sum_t S_t * g_t / T`` (or the ``"selected"`` normalization) from
    :func:`fsmtl_kernels.masked_grad_average`; ``dense_params`` (shared but unmasked) get the
    plain task average; ``head_params`` get the gradient of ``sum_t L_t`` (each head only sees
    its own task). ``mask=None`` means every task holds every entry (dense MTL).
    Existing ``.grad`` of the masked and dense parameters is overwritten, heads accumulate.
    ``head_params`` is required: forgetting it would silently leave the heads untrained; pass
    ``head_params=()`` when the heads get their gradient elsewhere.
    """
    if head_params is None:
        raise TypeError(
            "masked_multitask_backward needs head_params (e.g. model.head_parameters()); "
            "pass head_params=() if the heads get their gradient elsewhere"
        )
    losses = list(losses)
    if not losses:
        raise ValueError("losses must not be empty")
    for t, loss in enumerate(losses):
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            got = getattr(loss, "shape", type(loss).__name__)
            raise ValueError(f"losses[{t}] must be a scalar tensor (one loss per task), got {got}")
    if mask is not None and mask.num_tasks != len(losses):
        raise ValueError(f"mask has {mask.num_tasks} tasks but there are {len(losses)} losses")
    shared = list(masked_params) + list(dense_params)
    grads = per_task_gradients(losses, shared, batched=batched)
    n_masked = len(masked_params)
    if mask is None:
        for p, g in zip(shared, grads):
            p.grad = g.mean(0)
    else:
        fk.masked_grad_average(grads[:n_masked], mask, normalize=normalize, params=list(masked_params))
        for p, g in zip(dense_params, grads[n_masked:]):
            p.grad = g.mean(0)
    if head_params:
        torch.autograd.backward(torch.stack([loss.reshape(()) for loss in losses]).sum(), inputs=list(head_params))


def dense_multitask_backward(losses: Sequence[torch.Tensor], shared_params: Sequence[torch.Tensor]) -> None:
    """Dense MTL in one backward pass: ``shared_params`` get the task average ``1/T sum_t g_t``,
    every other parameter the gradient of ``sum_t L_t`` (accumulated into ``.grad``)."""
    torch.stack([loss.reshape(()) for loss in losses]).sum().backward()
    with torch.no_grad():
        for p in shared_params:
            if p.grad is not None:
                p.grad.div_(len(losses))
