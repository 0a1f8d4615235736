"""``nn.MultiheadAttention`` with its projections visible to the layer rules.

``nn.MultiheadAttention`` uses its parameters inside ``F.multi_head_attention_forward``
(``in_proj_weight`` packed or ``q/k/v_proj_weight`` separate, ``out_proj.weight`` used
functionally), where no hook can see the projections' inputs and outputs. While the engine
estimates, each such module runs :func:`attention_forward` instead: the same computation, op for
op where it matters (masks canonicalised and merged as torch does, ``scale = 1/sqrt(head_dim)``,
``baddbmm`` + softmax when weights are returned, ``scaled_dot_product_attention`` otherwise), with
every projection an ``F.linear`` call that ``project`` records. Those calls then get the Linear
rule on ``[N, L, E]`` inputs (samples along dim 0 whatever ``batch_first`` is), ``bias_k`` /
``bias_v`` enter through an ``expand`` over samples (the broadcast rule of the engine), and the
attention core itself (no parameters) is left to the batched backward.

Calls this does not cover (unbatched 2-D inputs, nested tensors) run the module's own forward;
their parameters then take the fallback.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

#: ``project(x, weight, weight_rows, bias, bias_rows)`` -> ``F.linear(x, weight[rows], bias[rows])``
Project = Callable[[torch.Tensor, torch.Tensor, slice | None, torch.Tensor | None, slice | None], torch.Tensor]


def covers(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    """Whether :func:`attention_forward` handles the call (else the module's own forward runs)."""
    return (
        query.dim() == 3
        and key.dim() == 3
        and value.dim() == 3
        and not (query.is_nested or key.is_nested or value.is_nested)
    )


def _project_inputs(m: nn.MultiheadAttention, project: Project, query, key, value):
    """q, k, v ``[N, L, E]`` from the module's packed or separate projection weights."""
    e = m.embed_dim
    b = m.in_proj_bias
    rows = [slice(0, e), slice(e, 2 * e), slice(2 * e, 3 * e)]
    if not m._qkv_same_embed_dim:
        weights = (m.q_proj_weight, m.k_proj_weight, m.v_proj_weight)
        return tuple(
            project(t, w, None, b, r if b is not None else None)
            for t, w, r in zip((query, key, value), weights, rows, strict=True)
        )
    w = m.in_proj_weight
    if key is value and query is key:  # self-attention: one projection, as torch does
        return project(query, w, None, b, None).split(e, dim=-1)
    if key is value:
        q = project(query, w, rows[0], b, rows[0] if b is not None else None)
        kv_rows = slice(e, 3 * e)
        k, v = project(key, w, kv_rows, b, kv_rows if b is not None else None).split(e, dim=-1)
        return q, k, v
    return tuple(
        project(t, w, r, b, r if b is not None else None) for t, r in zip((query, key, value), rows, strict=True)
    )


def attention_forward(
    m: nn.MultiheadAttention,
    project: Project,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    need_weights: bool = True,
    attn_mask: torch.Tensor | None = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``m(query, key, value, ...)`` for batched inputs, every projection through ``project``."""
    key_padding_mask = F._canonical_mask(
        mask=key_padding_mask,
        mask_name="key_padding_mask",
        other_type=F._none_or_dtype(attn_mask),
        other_name="attn_mask",
        target_type=query.dtype,
    )
    attn_mask = F._canonical_mask(
        mask=attn_mask,
        mask_name="attn_mask",
        other_type=None,
        other_name="",
        target_type=query.dtype,
        check_other=False,
    )
    if not m.batch_first:  # samples along dim 0 from here on; `is` identities kept
        if key is value:
            if query is key:
                query = key = value = query.transpose(0, 1)
            else:
                query, key = query.transpose(0, 1), key.transpose(0, 1)
                value = key
        else:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    n, tgt_len, e = query.shape
    heads = m.num_heads
    head_dim = e // heads
    if e != m.embed_dim:
        raise AssertionError(f"was expecting embedding dimension of {m.embed_dim}, but got {e}")
    if is_causal and attn_mask is None:
        raise RuntimeError(
            "Need attn_mask if specifying the is_causal hint. You may use the Transformer module method "
            "`generate_square_subsequent_mask` to create this mask."
        )
    if is_causal and key_padding_mask is None and not need_weights:
        attn_mask = None  # scaled_dot_product_attention's own causal mask
    elif key_padding_mask is not None:
        is_causal = False

    q, k, v = _project_inputs(m, project, query, key, value)
    src_len = k.shape[1]
    if attn_mask is not None:
        if attn_mask.dim() == 2:
            if attn_mask.shape != (tgt_len, src_len):
                raise RuntimeError(
                    f"The shape of the 2D attn_mask is {attn_mask.shape}, but should be {(tgt_len, src_len)}."
                )
            attn_mask = attn_mask.view(1, 1, tgt_len, src_len)
        elif attn_mask.dim() == 3:
            if attn_mask.shape != (n * heads, tgt_len, src_len):
                raise RuntimeError(
                    f"The shape of the 3D attn_mask is {attn_mask.shape}, but should be "
                    f"{(n * heads, tgt_len, src_len)}."
                )
            attn_mask = attn_mask.view(n, heads, tgt_len, src_len)
        else:
            raise RuntimeError(f"attn_mask's dimension {attn_mask.dim()} is not supported")
    if m.bias_k is not None and m.bias_v is not None:
        # The learned key/value of every sample: an expand over samples, a per-sample gradient each.
        k = torch.cat([k, m.bias_k.expand(n, 1, e)], dim=1)
        v = torch.cat([v, m.bias_v.expand(n, 1, e)], dim=1)
        attn_mask = F.pad(attn_mask, (0, 1)) if attn_mask is not None else None
        key_padding_mask = F.pad(key_padding_mask, (0, 1)) if key_padding_mask is not None else None
    q = q.reshape(n, tgt_len, heads, head_dim).transpose(1, 2)
    k = k.reshape(n, k.shape[1], heads, head_dim).transpose(1, 2)
    v = v.reshape(n, v.shape[1], heads, head_dim).transpose(1, 2)
    if m.add_zero_attn:
        zeros = torch.zeros(n, heads, 1, head_dim, dtype=k.dtype, device=k.device)
        k, v = torch.cat([k, zeros], dim=2), torch.cat([v, zeros], dim=2)
        attn_mask = F.pad(attn_mask, (0, 1)) if attn_mask is not None else None
        key_padding_mask = F.pad(key_padding_mask, (0, 1)) if key_padding_mask is not None else None
    src_len = k.shape[2]
    if key_padding_mask is not None:
        if key_padding_mask.shape != (n, src_len):
            raise AssertionError(
                f"expecting key_padding_mask shape of {(n, src_len)}, but got {tuple(key_padding_mask.shape)}"
            )
        padding = key_padding_mask.view(n, 1, 1, src_len)
        attn_mask = padding if attn_mask is None else attn_mask + padding
    dropout_p = m.dropout if m.training else 0.0

    if need_weights:  # a causal call keeps its attn_mask here (it is dropped above only without weights)
        scores = (q * math.sqrt(1.0 / float(head_dim))) @ k.transpose(-2, -1)
        if attn_mask is not None:
            scores = scores + attn_mask
        weights = torch.softmax(scores, dim=-1)
        if dropout_p > 0.0:
            weights = F.dropout(weights, p=dropout_p)
        context = weights @ v
    else:
        context = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)
        weights = None
    context = context.transpose(1, 2).reshape(n, tgt_len, e)
    out = project(context, m.out_proj.weight, None, m.out_proj.bias, None)
    if not m.batch_first:
        out = out.transpose(0, 1)
    if weights is not None and average_attn_weights:
        weights = weights.mean(dim=1)
    return out, weights
