"""Fused Fisher accumulation: ``F_i += scale * sum_n g_in**2`` over all parameters in one launch.

Paper Eq. 10 (empirical Fisher as the mean of squared per-sample gradients). Bytes moved:
one read of every gradient (``N * P * itemsize``) plus a read and a write of the float32 Fisher
buffers (``8 * P``); no temporary the size of the gradients.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _utils


@triton.jit
def _fisher_accumulate_kernel(
    table_ptr,  # int64 [S, 4] segment table: fisher pointer, grads pointer, entries n, first block
    n_segments,  # rows of the table
    n_samples,  # N per-sample rows (1 for batch gradients)
    scale,  # float multiplier of the squares
    LOG_SEGMENTS: tl.constexpr,  # binary-search steps over the table
    G_DTYPE: tl.constexpr,  # element type of the gradients (fp16/bf16/fp32)
    BLOCK: tl.constexpr,  # entries per program
    ALIGNED: tl.constexpr,  # pointers 16-byte aligned and sizes multiples of 8 (vector loads)
):
    """``F[j] += scale * sum_s g[s, j]**2`` for the ``BLOCK`` entries of one parameter's block;
    gradients are upcast to float32 before squaring so fp16 squares cannot overflow."""
    pid = tl.program_id(0).to(tl.int64)
    seg = _utils.find_segment(table_ptr + 3, 4, n_segments, pid, LOG_SEGMENTS)
    row = table_ptr + seg * 4
    f_ptr = tl.load(row).to(tl.pointer_type(tl.float32))
    g_ptr = tl.load(row + 1).to(tl.pointer_type(G_DTYPE))
    n = tl.load(row + 2)
    first = tl.load(row + 3)
    if ALIGNED:
        f_ptr = tl.multiple_of(f_ptr, 16)
        g_ptr = tl.multiple_of(g_ptr, 16)
        n = tl.multiple_of(n, 8)
    offs = (pid - first) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(n_samples):
        g = tl.load(g_ptr + s * n + offs, mask=mask, other=0.0).to(tl.float32)
        acc += g * g
    f = tl.load(f_ptr + offs, mask=mask, other=0.0)
    tl.store(f_ptr + offs, f + scale * acc, mask=mask)


def fisher_accumulate_forward(fisher: list[torch.Tensor], grads: list[torch.Tensor], scale: float, per_sample: bool):
    """Launch the kernel once per gradient dtype present and alignment class (see
    :func:`_utils.is_aligned`): usually two launches, the aligned weights and the odd-sized rest.

    Non-contiguous gradients are made contiguous (the kernel indexes ``[N, n]`` rows); a
    non-contiguous Fisher buffer is updated through a contiguous copy written back afterwards.
    """
    block = _utils.block_size("fisher", max(f.numel() for f in fisher))
    n_samples = grads[0].shape[0] if per_sample else 1
    device = fisher[0].device
    groups: dict[tuple[torch.dtype, bool], list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
    for f, g in zip(fisher, grads, strict=True):
        if f.numel() == 0 or n_samples == 0:
            continue
        g = g.contiguous()
        work = f if f.is_contiguous() else f.contiguous()
        aligned = _utils.is_aligned((work.data_ptr(), g.data_ptr()), work.numel())
        groups.setdefault((g.dtype, aligned), []).append((f, work, g))
    for (dtype, aligned), items in groups.items():
        starts, total_blocks = _utils.block_starts([w.numel() for _, w, _ in items], block)
        rows = [(w.data_ptr(), g.data_ptr(), w.numel(), s) for (_, w, g), s in zip(items, starts, strict=True)]
        table = _utils.segment_table(rows, device)
        _fisher_accumulate_kernel[(total_blocks,)](
            table,
            len(rows),
            n_samples,
            scale,
            LOG_SEGMENTS=_utils.log2_ceil(len(rows)),
            G_DTYPE=_utils.TL_DTYPES[dtype],
            BLOCK=block,
            ALIGNED=aligned,
            num_warps=_utils.num_warps(block),
        )
        for f, work, _ in items:
            if work is not f:
                f.copy_(work)


@torch.library.custom_op(
    "fsmtl_triton::fisher_accumulate",
    mutates_args=("fisher",),
    schema="(Tensor(a!)[] fisher, Tensor[] grads, float scale, bool per_sample) -> ()",
)
def fisher_accumulate_op(fisher, grads, scale, per_sample):
    # A custom_op (opaque to torch.compile) rather than a triton_op: the launcher reads data
    # pointers into the segment table, which fake tensors under tracing do not have.
    fisher_accumulate_forward(fisher, grads, scale, per_sample)


@fisher_accumulate_op.register_fake
def _(fisher, grads, scale, per_sample):
    return None
