"""Exact per-layer rules: ``sum_n (d loss_n / d p)**2`` from one batched backward.

Each rule receives what one module call saw and what the batched backward of ``sum_n loss_n``
gives at its output:

* ``x``: the module's input, samples along dim 0 (``[N, ...]``);
* ``g``: the gradient of ``sum_n loss_n`` w.r.t. the module's output (``[N, ...]``). Because
  sample ``n``'s loss depends only on sample ``n``, row ``n`` of ``g`` is ``d loss_n / d out_n``;
* ``bufs``: float32 Fisher buffers of the parameters to estimate, by attribute name
  (``"weight"`` and/or ``"bias"``), updated in place with ``+= scale * sum_n grad_n**2``.

The rules form per-sample gradients only where no closed form exists, and then only for
``chunk`` samples at a time, so their extra memory is ``O(chunk * P_layer + N * activation)``.
Squares are summed by :func:`fsmtl_kernels.fisher_accumulate` / :func:`fsmtl_kernels.linear_fisher`
so the selected kernel backend does the accumulation; the Embedding rule is the exception, a sparse
scatter into the rows of the tokens present (``index_add_``), which a dense kernel cannot do. A rule applies only when
:func:`find_rule` returns it for the module *and* :meth:`Rule.accepts` agrees for the call.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import GRAD_DTYPES
from ..fisher_accumulate import fisher_accumulate
from ..linear_fisher import linear_fisher

_HALF = (torch.float16, torch.bfloat16)


def _work(t: torch.Tensor) -> torch.Tensor:
    """Half-precision operands are upcast so per-sample sums are formed in float32 (fp64 stays)."""
    return t.float() if t.dtype in _HALF else t


def _kern(t: torch.Tensor) -> torch.Tensor:
    """The kernels take fp16/bf16/fp32 gradients; float64 ones are rounded to float32 first."""
    return t if t.dtype in GRAD_DTYPES else t.float()


def _acc(bufs: list[torch.Tensor], grads: list[torch.Tensor], scale: float, backend: str) -> None:
    """``bufs[i] += scale * sum_n grads[i][n]**2`` for per-sample ``grads[i]`` ``[n, *shape_i]``."""
    if bufs:
        fisher_accumulate(bufs, [_kern(g) for g in grads], scale=scale, backend=backend)


@dataclass(frozen=True)
class Call:
    """What a rule needs from one module call and the backward through it."""

    module: nn.Module
    x: torch.Tensor  # input, samples along dim 0
    g: torch.Tensor  # grad of sum_n loss_n w.r.t. the output, same leading dim
    bufs: dict[str, torch.Tensor]  # float32 Fisher buffers by parameter name
    scale: float
    chunk: int
    backend: str


@dataclass(frozen=True)
class Rule:
    """A layer rule: which calls it accepts, and how it accumulates the Fisher."""

    name: str
    accepts: Callable[[nn.Module, torch.Tensor, int, bool], bool]  # (module, x, N, training at call)
    apply: Callable[[Call], None]


# ----------------------------------------------------------------------------------------- Linear
def _linear_accepts(m, x, n, training) -> bool:
    return x.dim() >= 2 and x.shape[0] == n and x.is_floating_point()


def _linear(c: Call) -> None:
    wb, bb = c.bufs.get("weight"), c.bufs.get("bias")
    x, g = c.x, c.g
    if x.dim() == 2:
        # sum_n (g_n a_n^T)**2 = (g*g)^T (a*a): no per-sample gradient at all.
        if wb is not None:
            linear_fisher(_kern(g), _kern(x), wb, bb, scale=c.scale, backend=c.backend)
        else:
            _acc([bb], [g], c.scale, c.backend)
        return
    # Sequence input [N, L..., in]: the per-sample gradient sum_l g_nl a_nl^T mixes positions, so
    # it is formed for `chunk` samples at a time by a batched matmul, squared and summed.
    n = x.shape[0]
    length = math.prod(x.shape[1:-1])
    x3 = _work(x).reshape(n, length, x.shape[-1])
    g3 = _work(g).reshape(n, length, g.shape[-1])
    if bb is not None:
        _acc([bb], [g3.sum(1)], c.scale, c.backend)
    if wb is not None:
        for s in range(0, n, c.chunk):
            per_sample = torch.bmm(g3[s : s + c.chunk].transpose(1, 2), x3[s : s + c.chunk])  # [c, out, in]
            _acc([wb], [per_sample], c.scale, c.backend)


# ------------------------------------------------------------------------------------ Conv1d / 2d
def _conv_accepts(m, x, n, training) -> bool:
    nd = 1 if isinstance(m, nn.Conv1d) else 2
    return x.dim() == nd + 2 and x.shape[0] == n and x.is_floating_point()


def _conv_geometry(m: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """The input as the convolution sees it (explicitly padded where the module pads it itself)."""
    if m.padding_mode != "zeros":
        return F.pad(x, m._reversed_padding_repeated_twice, mode=m.padding_mode), (0,) * len(m.kernel_size)
    if m.padding == "valid":
        return x, (0,) * len(m.kernel_size)
    if m.padding == "same":
        # ATen pads dilation*(k-1) in total, the smaller half on the left (as _convolution_mode does).
        pads: list[int] = []
        for k, d in zip(reversed(m.kernel_size), reversed(m.dilation), strict=True):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        return F.pad(x, pads), (0,) * len(m.kernel_size)
    return x, tuple(m.padding)


def _conv(c: Call) -> None:
    m, wb, bb = c.module, c.bufs.get("weight"), c.bufs.get("bias")
    x, g = _work(c.x), _work(c.g)
    n = x.shape[0]
    if bb is not None:
        _acc([bb], [g.flatten(2).sum(2)], c.scale, c.backend)
    if wb is None:
        return
    x, padding = _conv_geometry(m, x)
    weight_grad = torch.nn.grad.conv1d_weight if x.dim() == 3 else torch.nn.grad.conv2d_weight
    c_in, c_out, groups = m.in_channels, m.out_channels, m.groups
    for s in range(0, n, c.chunk):
        xc, gc = x[s : s + c.chunk], g[s : s + c.chunk]
        b = xc.shape[0]
        # Per-sample weight gradients as ONE weight gradient of a convolution whose groups are
        # (sample, group) pairs: input [1, b*Cin, ...], grad [1, b*Cout, ...], groups b*G gives
        # [b*Cout, Cin/G, k...]. Exact, and on CPU (2.13, 1 thread) 3x faster than unfold+einsum
        # for a 16->32 3x3 conv on 14x14 maps, without the [b, Cin*k*k, L] column copy.
        per_sample = weight_grad(
            xc.reshape(1, b * c_in, *xc.shape[2:]),
            (b * c_out, *m.weight.shape[1:]),
            gc.reshape(1, b * c_out, *gc.shape[2:]),
            stride=m.stride,
            padding=padding,
            dilation=m.dilation,
            groups=b * groups,
        )
        _acc([wb], [per_sample.view(b, *m.weight.shape)], c.scale, c.backend)


# --------------------------------------------------------------------------------------- Embedding
def _embedding_accepts(m, x, n, training) -> bool:
    # scale_grad_by_freq rescales by batch-level token counts, which couples samples.
    return x.dim() >= 1 and x.shape[0] == n and not m.scale_grad_by_freq and not x.is_floating_point()


def _embedding(c: Call) -> None:
    m, wb = c.module, c.bufs.get("weight")
    vocab, dim = m.weight.shape
    n = c.x.shape[0]
    idx = c.x.reshape(n, -1)
    rows = torch.arange(n, device=idx.device).unsqueeze(1).expand_as(idx)
    keys = (rows * vocab + idx).reshape(-1)
    g = _work(c.g).reshape(-1, dim)
    if m.padding_idx is not None:  # the padding row never receives a gradient
        keep = idx.reshape(-1) != m.padding_idx
        keys, g = keys[keep], g[keep]
    # Sample n's gradient row for token v is the sum of g over n's positions holding v: repeated
    # tokens add before squaring. (sample, token) pairs are made unique, their rows summed, squared,
    # and scattered into the vocabulary rows; this is sparse, so it is a scatter, not a dense kernel.
    uniq, inverse = torch.unique(keys, return_inverse=True)
    summed = torch.zeros(uniq.numel(), dim, dtype=g.dtype, device=g.device).index_add_(0, inverse, g)
    wb.index_add_(0, uniq % vocab, summed.square().float(), alpha=c.scale)


# ------------------------------------------------------------------------------------ norm layers
def _affine(c: Call, x_hat: torch.Tensor, reduce_shape: tuple[int, ...]) -> None:
    """Weight gradient ``sum (g * x_hat)``, bias ``sum g``, over the positions that share a parameter.

    ``reduce_shape`` views ``[N, ...]`` as ``[N, R, *param_shape]`` or ``[N, *param_shape, R]``.
    """
    g = _work(c.g)
    bufs, grads = [], []
    dim = 1 if reduce_shape[1] == -1 else -1
    if "weight" in c.bufs:
        bufs.append(c.bufs["weight"])
        grads.append((g * x_hat).reshape(reduce_shape).sum(dim))
    if "bias" in c.bufs:
        bufs.append(c.bufs["bias"])
        grads.append(g.reshape(reduce_shape).sum(dim))
    _acc(bufs, grads, c.scale, c.backend)


def _layer_norm_accepts(m, x, n, training) -> bool:
    return x.dim() > len(m.normalized_shape) and x.shape[0] == n and x.is_floating_point()


def _layer_norm(c: Call) -> None:
    m = c.module
    shape = tuple(m.normalized_shape)
    x_hat = F.layer_norm(_work(c.x), shape, None, None, m.eps)
    _affine(c, x_hat, (c.x.shape[0], -1, *shape))


def _rms_norm(c: Call) -> None:
    m = c.module
    shape = tuple(m.normalized_shape)
    x_hat = F.rms_norm(_work(c.x), shape, None, m.eps)
    _affine(c, x_hat, (c.x.shape[0], -1, *shape))


def _channel_accepts(m, x, n, training) -> bool:
    return x.dim() >= 2 and x.shape[0] == n and x.is_floating_point()


def _group_norm(c: Call) -> None:
    m = c.module
    x_hat = F.group_norm(_work(c.x), m.num_groups, None, None, m.eps)
    _affine(c, x_hat, (c.x.shape[0], m.num_channels, -1))


def _batch_norm_accepts(m, x, n, training) -> bool:
    # Only the running-statistics (eval) forward keeps samples independent.
    return not training and m.running_mean is not None and _channel_accepts(m, x, n, training)


def _batch_norm(c: Call) -> None:
    m = c.module
    x = _work(c.x)
    mean, var = m.running_mean.to(x.dtype), m.running_var.to(x.dtype)
    x_hat = F.batch_norm(x, mean, var, None, None, False, 0.0, m.eps)
    _affine(c, x_hat, (c.x.shape[0], m.num_features, -1))


_LINEAR = Rule("linear", _linear_accepts, _linear)
_CONV = Rule("conv", _conv_accepts, _conv)
_RULES: list[tuple[type[nn.Module], Rule, tuple[str, ...]]] = [
    (nn.Linear, _LINEAR, ("forward",)),
    (nn.Conv1d, _CONV, ("forward", "_conv_forward")),
    (nn.Conv2d, _CONV, ("forward", "_conv_forward")),
    (nn.Embedding, Rule("embedding", _embedding_accepts, _embedding), ("forward",)),
    (nn.LayerNorm, Rule("layer_norm", _layer_norm_accepts, _layer_norm), ("forward",)),
    (nn.RMSNorm, Rule("rms_norm", _layer_norm_accepts, _rms_norm), ("forward",)),
    (nn.GroupNorm, Rule("group_norm", _channel_accepts, _group_norm), ("forward",)),
    (nn.BatchNorm1d, Rule("batch_norm", _batch_norm_accepts, _batch_norm), ("forward",)),
    (nn.BatchNorm2d, Rule("batch_norm", _batch_norm_accepts, _batch_norm), ("forward",)),
    (nn.BatchNorm3d, Rule("batch_norm", _batch_norm_accepts, _batch_norm), ("forward",)),
]

#: Module types with an exact rule (their ``weight`` / ``bias``); everything else uses the fallback.
SUPPORTED_MODULES: tuple[type[nn.Module], ...] = tuple(t for t, _, _ in _RULES)


def find_rule(module: nn.Module) -> Rule | None:
    """The rule for ``module``, or None (fallback) when its class or its forward is not a known one.

    Subclasses qualify only when they keep the base class's forward (a LoRA layer that overrides
    ``forward`` is not a Linear for these purposes).
    """
    for base, rule, methods in _RULES:
        if isinstance(module, base) and all(getattr(type(module), f) is getattr(base, f) for f in methods):
            return rule
    return None
