"""Exact per-layer rules: ``sum_n (d loss_n / d p)**2`` from one batched backward.

Each rule receives what one layer call saw and what the batched backward of ``sum_n loss_n``
gives at its output:

* ``x``: the call's input, samples along dim 0 (``[N, ...]``);
* ``g``: the gradient of ``sum_n loss_n`` w.r.t. the call's output (``[N, ...]``). Because
  sample ``n``'s loss depends only on sample ``n``, row ``n`` of ``g`` is ``d loss_n / d out_n``;
* ``bufs``: float32 Fisher buffers of the parameters to estimate, by attribute name
  (``"weight"`` and/or ``"bias"``), updated in place with ``+= scale * sum_n grad_n**2``.

A rule has two entry points. :attr:`Rule.apply` accumulates the squares of a parameter used by
this call alone, in the cheapest exact form: ``(g*g)^T (a*a)`` for a Linear on ``[N, in]``
inputs (no per-sample gradient at all), a sparse scatter for an Embedding, per-sample gradients
``G_n^T X_n`` formed in blocks of samples and rows for a Linear (or GPT-2 ``Conv1D``) on
``[N, L, in]`` inputs (exact for any ``L``; the ``(g*g)^T (a*a)`` form is exact only for
``L = 1``), grouped-convolution weight gradients for convolutions. :attr:`Rule.per_sample` gives
the per-sample gradients ``[c, *shape]`` of samples ``start:stop``, for parameters used by
several calls (a reused module, an embedding tied to the output layer), whose per-sample
gradients must be summed over the calls before squaring.

Blocks are sized so that a per-sample block holds at most :data:`BLOCK_ELEMENTS` entries (and at
most ``chunk`` samples): the extra memory of a rule is ``O(BLOCK_ELEMENTS + N * width)``.
Squares are summed by :func:`fsmtl_kernels.fisher_accumulate` / :func:`fsmtl_kernels.linear_fisher`
so the selected kernel backend does the accumulation; the Embedding rule is the exception, a
sparse scatter into the rows of the tokens present (``index_add_``), which a dense kernel cannot
do. A rule applies only when :func:`find_rule` returns it for the module *and*
:meth:`Rule.accepts` agrees for the call.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import GRAD_DTYPES
from ..fisher_accumulate import fisher_accumulate
from ..linear_fisher import linear_fisher

_HALF = (torch.float16, torch.bfloat16)

#: Largest per-sample gradient block a rule forms at once (entries): 4M, 16 MiB in float32.
BLOCK_ELEMENTS = 1 << 22


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


def sample_block(chunk: int, per_sample_numel: int) -> int:
    """Samples per block: at most ``chunk``, and at most :data:`BLOCK_ELEMENTS` entries in all."""
    return max(1, min(chunk, BLOCK_ELEMENTS // max(1, per_sample_numel)))


@dataclass(frozen=True)
class Call:
    """What a rule needs from one layer call and the backward through it."""

    module: nn.Module
    x: torch.Tensor  # input, samples along dim 0
    g: torch.Tensor  # grad of sum_n loss_n w.r.t. the output, same leading dim
    bufs: dict[str, torch.Tensor]  # float32 Fisher buffers by parameter name
    scale: float
    chunk: int
    backend: str


@dataclass(frozen=True)
class Rule:
    """A layer rule: which calls it accepts, how it accumulates the Fisher of parameters only this
    call uses, and the per-sample gradients ``{name: [stop - start, *shape]}`` of samples
    ``start:stop`` of the parameters named (for parameters several calls use)."""

    name: str
    accepts: Callable[[nn.Module, torch.Tensor, int, bool], bool]  # (module, x, N, training at call)
    apply: Callable[[Call], None]
    per_sample: Callable[[Call, int, int, tuple[str, ...]], dict[str, torch.Tensor]]


# ---------------------------------------------------------------------------- Linear and Conv1D
def _seq(t: torch.Tensor) -> torch.Tensor:
    """``[N, L..., f]`` as ``[N, L, f]`` (working precision)."""
    return _work(t).reshape(t.shape[0], -1, t.shape[-1])


def outer_squares(buf: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: Call) -> None:
    """``buf += scale * sum_n (a_n^T b_n)**2`` for ``a`` ``[N, L, p]``, ``b`` ``[N, L, q]``.

    The per-sample products ``[samples, rows, q]`` are formed by a batched matmul in blocks of at
    most :data:`BLOCK_ELEMENTS` entries (rows of ``buf`` and samples), squared and summed; the
    matmuls do the FLOPs of one weight gradient ``sum_n a_n^T b_n``.
    """
    n, _, p = a.shape
    q = b.shape[-1]
    rows = max(1, min(p, BLOCK_ELEMENTS // max(1, q)))
    samples = sample_block(c.chunk, rows * q)
    at = a.transpose(1, 2)
    for r in range(0, p, rows):
        for s in range(0, n, samples):
            per_sample = torch.bmm(at[s : s + samples, r : r + rows], b[s : s + samples])
            _acc([buf[r : r + rows]], [per_sample], c.scale, c.backend)


def _linear_accepts(m, x, n, training) -> bool:
    return x.dim() >= 2 and x.shape[0] == n and x.is_floating_point()


def _linear(c: Call) -> None:
    wb, bb = c.bufs.get("weight"), c.bufs.get("bias")
    x, g = c.x, c.g
    if x.dim() == 2:
        # sum_n (g_n a_n^T)**2 = (g*g)^T (a*a): no per-sample gradient at all.
        if wb is not None:
            linear_fisher(_kern(g), _kern(x), wb, bb, scale=c.scale, backend=c.backend)
        elif bb is not None:
            _acc([bb], [g], c.scale, c.backend)
        return
    # Sequence input [N, L..., in]: the per-sample gradient sum_l g_nl a_nl^T mixes positions, so
    # (g*g)^T (a*a) is not exact; G_n^T X_n is formed in blocks.
    g3 = _seq(g)
    if bb is not None:
        _acc([bb], [g3.sum(1)], c.scale, c.backend)
    if wb is not None:
        outer_squares(wb, g3, _seq(x), c)


def _linear_per_sample(c: Call, start: int, stop: int, names) -> dict[str, torch.Tensor]:
    g3, out = _seq(c.g[start:stop]), {}
    if "weight" in names:
        out["weight"] = torch.bmm(g3.transpose(1, 2), _seq(c.x[start:stop]))
    if "bias" in names:
        out["bias"] = g3.sum(1)
    return out


def _conv1d_gpt(c: Call) -> None:
    """Hugging Face GPT-2's ``Conv1D``: ``y = x @ W + b`` with ``W`` ``[in, out]``."""
    wb, bb = c.bufs.get("weight"), c.bufs.get("bias")
    x, g = c.x, c.g
    if x.dim() == 2:
        if wb is not None:  # W is [in, out]: (a*a)^T (g*g)
            linear_fisher(_kern(x), _kern(g), wb, None, scale=c.scale, backend=c.backend)
        if bb is not None:
            _acc([bb], [g], c.scale, c.backend)
        return
    g3 = _seq(g)
    if bb is not None:
        _acc([bb], [g3.sum(1)], c.scale, c.backend)
    if wb is not None:
        outer_squares(wb, _seq(x), g3, c)


def _conv1d_gpt_per_sample(c: Call, start: int, stop: int, names) -> dict[str, torch.Tensor]:
    g3, out = _seq(c.g[start:stop]), {}
    if "weight" in names:
        out["weight"] = torch.bmm(_seq(c.x[start:stop]).transpose(1, 2), g3)
    if "bias" in names:
        out["bias"] = g3.sum(1)
    return out


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


def _conv_weight_per_sample(m: nn.Module, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per-sample weight gradients ``[b, *weight.shape]`` of samples ``x``/``g`` (working precision).

    ONE weight gradient of a convolution whose groups are (sample, group) pairs: input
    ``[1, b*Cin, ...]``, grad ``[1, b*Cout, ...]``, groups ``b*G`` gives ``[b*Cout, Cin/G, k...]``.
    Exact, and on CPU (2.13, 1 thread) 3x faster than unfold+einsum for a 16->32 3x3 conv on 14x14
    maps, without the ``[b, Cin*k*k, L]`` column copy.
    """
    x, padding = _conv_geometry(m, x)
    weight_grad = torch.nn.grad.conv1d_weight if x.dim() == 3 else torch.nn.grad.conv2d_weight
    b = x.shape[0]
    per_sample = weight_grad(
        x.reshape(1, b * m.in_channels, *x.shape[2:]),
        (b * m.out_channels, *m.weight.shape[1:]),
        g.reshape(1, b * m.out_channels, *g.shape[2:]),
        stride=m.stride,
        padding=padding,
        dilation=m.dilation,
        groups=b * m.groups,
    )
    return per_sample.view(b, *m.weight.shape)


def _conv(c: Call) -> None:
    m, wb, bb = c.module, c.bufs.get("weight"), c.bufs.get("bias")
    x, g = _work(c.x), _work(c.g)
    if bb is not None:
        _acc([bb], [g.flatten(2).sum(2)], c.scale, c.backend)
    if wb is None:
        return
    samples = sample_block(c.chunk, m.weight.numel())
    for s in range(0, x.shape[0], samples):
        _acc([wb], [_conv_weight_per_sample(m, x[s : s + samples], g[s : s + samples])], c.scale, c.backend)


def _conv_per_sample(c: Call, start: int, stop: int, names) -> dict[str, torch.Tensor]:
    x, g, out = _work(c.x[start:stop]), _work(c.g[start:stop]), {}
    if "weight" in names:
        out["weight"] = _conv_weight_per_sample(c.module, x, g)
    if "bias" in names:
        out["bias"] = g.flatten(2).sum(2)
    return out


# --------------------------------------------------------------------------------------- Embedding
def _embedding_accepts(m, x, n, training) -> bool:
    # scale_grad_by_freq rescales by batch-level token counts, which couples samples.
    return x.dim() >= 1 and x.shape[0] == n and not m.scale_grad_by_freq and not x.is_floating_point()


def _token_rows(c: Call, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sample within the block, token, gradient row) of every position of samples start:stop that
    is not the padding index."""
    m = c.module
    idx = c.x[start:stop].reshape(stop - start, -1)
    rows = torch.arange(stop - start, device=idx.device).unsqueeze(1).expand_as(idx).reshape(-1)
    tokens = idx.reshape(-1)
    g = _work(c.g[start:stop]).reshape(-1, m.weight.shape[1])
    if m.padding_idx is not None:  # the padding row never receives a gradient
        keep = tokens != m.padding_idx
        rows, tokens, g = rows[keep], tokens[keep], g[keep]
    return rows, tokens, g


def _embedding(c: Call) -> None:
    wb = c.bufs.get("weight")
    vocab, dim = c.module.weight.shape
    rows, tokens, g = _token_rows(c, 0, c.x.shape[0])
    # Sample n's gradient row for token v is the sum of g over n's positions holding v: repeated
    # tokens add before squaring. (sample, token) pairs are made unique, their rows summed, squared,
    # and scattered into the vocabulary rows; this is sparse, so it is a scatter, not a dense kernel.
    uniq, inverse = torch.unique(rows * vocab + tokens, return_inverse=True)
    summed = torch.zeros(uniq.numel(), dim, dtype=g.dtype, device=g.device).index_add_(0, inverse, g)
    wb.index_add_(0, uniq % vocab, summed.square().float(), alpha=c.scale)


def _embedding_per_sample(c: Call, start: int, stop: int, names) -> dict[str, torch.Tensor]:
    rows, tokens, g = _token_rows(c, start, stop)
    dense = torch.zeros(stop - start, *c.module.weight.shape, dtype=g.dtype, device=g.device)
    return {"weight": dense.index_put_((rows, tokens), g, accumulate=True)}


# ------------------------------------------------------------------------------------ norm layers
def _affine_per_sample(c: Call, start, stop, names, x_hat: torch.Tensor, reduce_shape) -> dict[str, torch.Tensor]:
    """Weight gradient ``sum (g * x_hat)``, bias ``sum g``, over the positions that share a parameter.

    ``reduce_shape`` views ``[b, ...]`` as ``[b, R, *param_shape]`` or ``[b, *param_shape, R]``.
    """
    g = _work(c.g[start:stop])
    b = stop - start
    shape = (b, *reduce_shape)
    dim = 1 if reduce_shape[0] == -1 else -1
    out = {}
    if "weight" in names:
        out["weight"] = (g * x_hat).reshape(shape).sum(dim)
    if "bias" in names:
        out["bias"] = g.reshape(shape).sum(dim)
    return out


def _from_per_sample(per_sample: Callable[[Call, int, int, tuple[str, ...]], dict[str, torch.Tensor]]):
    """``apply`` of a rule whose per-sample gradients are as small as its input (norm layers)."""

    def apply(c: Call) -> None:
        names = tuple(c.bufs)
        grads = per_sample(c, 0, c.x.shape[0], names)
        _acc([c.bufs[k] for k in names], [grads[k] for k in names], c.scale, c.backend)

    return apply


def _layer_norm_accepts(m, x, n, training) -> bool:
    return x.dim() > len(m.normalized_shape) and x.shape[0] == n and x.is_floating_point()


def _layer_norm_per_sample(c: Call, start, stop, names):
    m = c.module
    shape = tuple(m.normalized_shape)
    x_hat = F.layer_norm(_work(c.x[start:stop]), shape, None, None, m.eps)
    return _affine_per_sample(c, start, stop, names, x_hat, (-1, *shape))


def _rms_norm_per_sample(c: Call, start, stop, names):
    m = c.module
    shape = tuple(m.normalized_shape)
    x_hat = F.rms_norm(_work(c.x[start:stop]), shape, None, m.eps)
    return _affine_per_sample(c, start, stop, names, x_hat, (-1, *shape))


def _channel_accepts(m, x, n, training) -> bool:
    return x.dim() >= 2 and x.shape[0] == n and x.is_floating_point()


def _group_norm_per_sample(c: Call, start, stop, names):
    m = c.module
    x_hat = F.group_norm(_work(c.x[start:stop]), m.num_groups, None, None, m.eps)
    return _affine_per_sample(c, start, stop, names, x_hat, (m.num_channels, -1))


def _batch_norm_accepts(m, x, n, training) -> bool:
    # Only the running-statistics (eval) forward keeps samples independent.
    return not training and m.running_mean is not None and _channel_accepts(m, x, n, training)


def _batch_norm_per_sample(c: Call, start, stop, names):
    m = c.module
    x = _work(c.x[start:stop])
    mean, var = m.running_mean.to(x.dtype), m.running_var.to(x.dtype)
    x_hat = F.batch_norm(x, mean, var, None, None, False, 0.0, m.eps)
    return _affine_per_sample(c, start, stop, names, x_hat, (m.num_features, -1))


def _norm_rule(name, accepts, per_sample) -> Rule:
    return Rule(name, accepts, _from_per_sample(per_sample), per_sample)


LINEAR = Rule("linear", _linear_accepts, _linear, _linear_per_sample)
CONV1D_GPT = Rule("conv1d_gpt", _linear_accepts, _conv1d_gpt, _conv1d_gpt_per_sample)
_CONV = Rule("conv", _conv_accepts, _conv, _conv_per_sample)
_BATCH_NORM = _norm_rule("batch_norm", _batch_norm_accepts, _batch_norm_per_sample)
_RULES: list[tuple[type[nn.Module], Rule, tuple[str, ...]]] = [
    (nn.Linear, LINEAR, ("forward",)),
    (nn.Conv1d, _CONV, ("forward", "_conv_forward")),
    (nn.Conv2d, _CONV, ("forward", "_conv_forward")),
    (nn.Embedding, Rule("embedding", _embedding_accepts, _embedding, _embedding_per_sample), ("forward",)),
    (nn.LayerNorm, _norm_rule("layer_norm", _layer_norm_accepts, _layer_norm_per_sample), ("forward",)),
    (nn.RMSNorm, _norm_rule("rms_norm", _layer_norm_accepts, _rms_norm_per_sample), ("forward",)),
    (nn.GroupNorm, _norm_rule("group_norm", _channel_accepts, _group_norm_per_sample), ("forward",)),
    (nn.BatchNorm1d, _BATCH_NORM, ("forward",)),
    (nn.BatchNorm2d, _BATCH_NORM, ("forward",)),
    (nn.BatchNorm3d, _BATCH_NORM, ("forward",)),
]

#: Module types with an exact rule for their ``weight`` / ``bias`` (and, for
#: ``nn.MultiheadAttention``, its projections). Hugging Face GPT-2's ``Conv1D`` has one too, found
#: without importing ``transformers``. Everything else uses the fallback.
SUPPORTED_MODULES: tuple[type[nn.Module], ...] = (*(t for t, _, _ in _RULES), nn.MultiheadAttention)


def _hf_conv1d() -> type[nn.Module] | None:
    """``transformers.pytorch_utils.Conv1D`` if ``transformers`` is imported (never imported here)."""
    module = sys.modules.get("transformers.pytorch_utils")
    return getattr(module, "Conv1D", None)


def _keeps_forward(module: nn.Module, base: type, methods: tuple[str, ...]) -> bool:
    return "forward" not in vars(module) and all(getattr(type(module), f) is getattr(base, f) for f in methods)


def find_rule(module: nn.Module) -> Rule | None:
    """The rule for ``module``, or None (fallback) when its class or its forward is not a known one.

    Subclasses qualify only when they keep the base class's forward (a LoRA layer that overrides
    ``forward`` is not a Linear for these purposes). ``nn.MultiheadAttention`` is not here: its
    projections are recorded by :mod:`.attention`.
    """
    for base, rule, methods in _RULES:
        if isinstance(module, base) and _keeps_forward(module, base, methods):
            return rule
    conv1d = _hf_conv1d()
    if conv1d is not None and isinstance(module, conv1d) and _keeps_forward(module, conv1d, ("forward",)):
        return CONV1D_GPT
    return None


def is_attention(module: nn.Module) -> bool:
    """``nn.MultiheadAttention`` (or a subclass) with its own forward: its projections get rules."""
    return isinstance(module, nn.MultiheadAttention) and _keeps_forward(module, nn.MultiheadAttention, ("forward",))
