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
    accumulate_block(f_ptr, g_ptr, n, offs, offs < n, n_samples, scale, True, BLOCK)


@triton.jit
def accumulate_block(f_ptr, g_ptr, n, offs, mask, n_samples, scale, READ_F: tl.constexpr, BLOCK: tl.constexpr):
    """``F[offs] = F[offs] + scale * sum_s g[s, offs]**2`` (``F`` read as 0 without ``READ_F``:
    a fresh buffer), stored and returned; shared with the fused Fisher top-K so both give the
    same bits."""
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(n_samples):
        g = tl.load(g_ptr + s * n + offs, mask=mask, other=0.0).to(tl.float32)
        acc += g * g
    if READ_F:
        f = tl.load(f_ptr + offs, mask=mask, other=0.0)
    else:
        f = tl.zeros([BLOCK], dtype=tl.float32)
    f = f + scale * acc
    tl.store(f_ptr + offs, f, mask=mask)
    return f


def fisher_accumulate_forward(fisher, grads, scale, per_sample) -> None:
    """Kernel of ``torch.ops.fsmtl.fisher_accumulate`` for CUDA tensors (schema arguments).

    One launch per gradient dtype and alignment class (:func:`_utils.segment_launches`): usually
    two, the aligned weights and the odd-sized rest. Non-contiguous gradients are made contiguous
    (the kernel indexes ``[N, n]`` rows); a non-contiguous Fisher buffer is updated through a
    contiguous copy written back afterwards.
    """
    n_samples = grads[0].shape[0] if per_sample else 1
    if n_samples == 0:
        return
    grads = [g.contiguous() for g in grads]
    work = _utils.writable(fisher, keep_values=True)
    segments = [
        _utils.Segment((w.data_ptr(), g.data_ptr()), w.numel(), group=(g.dtype,))
        for w, g in zip(work, grads, strict=True)
    ]
    block = _utils.block_size("fisher", max(f.numel() for f in fisher))
    for launch in _utils.segment_launches(segments, block, fisher[0].device):
        _fisher_accumulate_kernel[(launch.n_blocks,)](
            launch.table, launch.n_segments, n_samples, scale, G_DTYPE=_utils.TL_DTYPES[launch.group[0]], **launch.meta
        )
    _utils.copy_back(fisher, work)


# The launcher reads data pointers into the segment table, which fake tensors under tracing do
# not have: the op is opaque to torch.compile (its fake is in fsmtl_kernels/fisher_accumulate.py).
torch.library.register_kernel("fsmtl::fisher_accumulate", "cuda", fisher_accumulate_forward)
