"""Per-sample gradients of the parameters no rule covers.

Two fallbacks, tried in this order:

1. :func:`module_vmap`: the smallest module whose single call contains every use of the
   parameter is run again under ``torch.func.vmap(torch.func.grad(...))``, one sample at a time
   (vectorised), with the gradient the batched backward gave its outputs as the cotangent:
   ``d loss_n / d p = J_p(module(x_n))^T (d loss_n / d out_n)``. Only that module's forward and
   backward are repeated, on ``chunk`` samples at a time, with ``scaled_dot_product_attention``
   on its math backend (which has a batching rule; the fused CPU kernels do not), so this is
   ``torch.func``'s per-sample gradient restricted to one module: never slower than
   ``vmap(grad)`` of the whole model on the same chunk.
2. :func:`graph_batched`: ``torch.autograd.grad(losses, params, grad_outputs=<one-hot rows>,
   is_grads_batched=True)`` for ``chunk`` samples at a time, through the whole graph (each chunk
   costs ``chunk`` backward passes of the batch). Used when the module cannot be re-run (its
   forward is not vmappable, a use sits outside any single module call, dropout in train mode).
   A graph holding fused attention kernels (no batching rule: the batched backward would loop
   over samples) is rebuilt first by running the closure again with the math backend.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._pytree import tree_flatten, tree_unflatten

from .._checks import GRAD_DTYPES
from ..fisher_accumulate import fisher_accumulate
from .rules import sample_block


def _accumulate(bufs: list[torch.Tensor], grads: Sequence[torch.Tensor | None], scale: float, backend: str) -> None:
    present = [(f, g) for f, g in zip(bufs, grads, strict=True) if g is not None]
    if present:
        fisher_accumulate(
            [f for f, _ in present],
            [g if g.dtype in GRAD_DTYPES else g.float() for _, g in present],
            scale=scale,
            backend=backend,
        )


def module_vmap(
    module: nn.Module,
    args: tuple,
    kwargs: dict,
    out_index: list[int],
    grads: list[torch.Tensor],
    params: dict[str, torch.Tensor],
    bufs: list[torch.Tensor],
    n: int,
    scale: float,
    chunk: int,
    backend: str,
) -> None:
    """``bufs[i] += scale * sum_n (d loss_n / d params[i])**2`` by ``vmap(grad)`` over ``module``.

    ``args``/``kwargs``: the module's call (tensors with ``n`` rows along dim 0 are split into
    samples, the others shared); ``out_index``: positions, among the tensor leaves of the call's
    output, of the outputs that carry the loss; ``grads``: the batched backward's gradient at
    each of them (row ``n`` is ``d loss_n / d out_n``); ``params``: names (as in
    ``module.named_parameters()``) of the parameters to estimate. Raises whatever ``vmap`` raises
    for a forward it cannot batch; ``bufs`` are then unchanged.
    """
    from torch.func import functional_call, grad, vmap

    flat, spec = tree_flatten((args, kwargs))
    flat = [t.detach() if isinstance(t, torch.Tensor) else t for t in flat]
    batched = [j for j, t in enumerate(flat) if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == n]
    names = list(params)
    values = tuple(params[k].detach() for k in names)
    grads = [g.detach() for g in grads]

    def loss_one(pv, sample_leaves, sample_grads):
        full = list(flat)
        for j, t in zip(batched, sample_leaves, strict=True):
            full[j] = t.unsqueeze(0)
        a, kw = tree_unflatten(full, spec)
        outs = [
            t
            for t in tree_flatten(functional_call(module, dict(zip(names, pv)), a, kw))[0]
            if isinstance(t, torch.Tensor)
        ]
        total = 0.0
        for j, g in zip(out_index, sample_grads, strict=True):
            total = total + (outs[j][0] * g).sum()
        return total

    per_sample = vmap(grad(loss_one), in_dims=(None, [0] * len(batched), [0] * len(grads)))
    samples = sample_block(chunk, sum(v.numel() for v in values))
    sums = [torch.zeros_like(b) for b in bufs]  # bufs change only once every chunk has run
    with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]):
        for s in range(0, n, samples):
            e = min(n, s + samples)
            _accumulate(
                sums, per_sample(values, [flat[j][s:e] for j in batched], [g[s:e] for g in grads]), scale, backend
            )
    for b, t in zip(bufs, sums, strict=True):
        b.add_(t)


def has_fused_attention(node_names: set[str]) -> bool:
    """Whether a graph with these node types holds a fused attention kernel (no batching rule)."""
    return any(name.startswith("ScaledDotProduct") for name in node_names)


def rerun_with_math_attention(closure: Callable[[], torch.Tensor]) -> torch.Tensor:
    """The closure's losses again, ``scaled_dot_product_attention`` on its math backend."""
    with torch.enable_grad(), sdpa_kernel([SDPBackend.MATH]):
        return closure()


def graph_batched(
    losses: torch.Tensor,
    params: list[torch.Tensor],
    bufs: list[torch.Tensor],
    scale: float,
    chunk: int,
    backend: str,
) -> None:
    """``bufs[i] += scale * sum_n (d loss_n / d params[i])**2`` by batched backward passes of
    ``chunk`` one-hot rows at a time (memory ``O(chunk * P_params)``)."""
    n = losses.shape[0]
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        onehot = torch.zeros(stop - start, n, dtype=losses.dtype, device=losses.device)
        onehot[torch.arange(stop - start), torch.arange(start, stop)] = 1
        grads = torch.autograd.grad(
            losses, params, grad_outputs=onehot, is_grads_batched=True, retain_graph=stop < n, allow_unused=True
        )
        _accumulate(bufs, grads, scale, backend)
