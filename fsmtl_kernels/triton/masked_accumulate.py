"""One task's masked gradient added into running sums (streaming form of paper Eq. 4).

``acc_i += S_task,i * g_i``: the gradient converted to the sum's dtype (fp32 or fp64), times the
0/1 mask bit (exact), added with one rounding, as the reference does. One launch over all
parameters (per dtype pair and alignment class). Bytes moved: ``P * itemsize(g)`` and one task's
mask row (``P / 8``) read, ``P * itemsize(acc)`` read and written.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _utils


@triton.jit
def _masked_accumulate_kernel(
    table_ptr,  # int64 [S, 5]: grad pointer, acc pointer, n, first block, word offset
    row_ptr,  # int32 [W]: task's row of the packed masks
    n_segments,  # rows of the table
    LOG_SEGMENTS: tl.constexpr,
    G_DTYPE: tl.constexpr,  # gradient element type (fp16/bf16/fp32/fp64)
    A_DTYPE: tl.constexpr,  # running-sum element type (fp32/fp64)
    BLOCK: tl.constexpr,  # entries per program, a multiple of 32
    ALIGNED: tl.constexpr,  # pointers 16-byte aligned and sizes multiples of 8 (vector loads)
):
    pid = tl.program_id(0).to(tl.int64)
    g_ptr, a_ptr, n, offs, mask, words, word_mask, cols = _utils.pointer_pair_tile(
        table_ptr, n_segments, pid, LOG_SEGMENTS, G_DTYPE, A_DTYPE, BLOCK, ALIGNED
    )
    # A [BLOCK // 32, 32] tile: each row's mask word is loaded once, its bits taken by shifts.
    w = tl.load(row_ptr + words, mask=word_mask, other=0)
    bit = ((w >> cols) & 1).to(A_DTYPE)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(A_DTYPE)
    a = tl.load(a_ptr + offs, mask=mask, other=0.0)
    tl.store(a_ptr + offs, a + g * bit, mask=mask)


def _launches(acc, grads, word_offsets, device):
    """The contiguous gradients, the writable accumulators (``acc`` or contiguous copies) and the
    kernel launches over the segments (one per parameter: its gradient, its accumulator, its first
    mask word). The launch tables hold raw pointers: the caller keeps the first two alive until its
    launches are done."""
    grads = [g.contiguous() for g in grads]
    work = _utils.writable(acc, keep_values=True)
    segments = [
        _utils.Segment((g.data_ptr(), a.data_ptr()), a.numel(), (offset,), (g.dtype, a.dtype))
        for g, a, offset in zip(grads, work, word_offsets, strict=True)
    ]
    block = _utils.block_size("average", max(a.numel() for a in acc))
    return grads, work, list(_utils.segment_launches(segments, block, device))


def masked_accumulate_forward(acc, grads, words, word_offsets, task) -> None:
    """Kernel of ``torch.ops.fsmtl.masked_accumulate`` for CUDA tensors (schema arguments): adds
    ``grads[i]`` masked by task ``task``'s bits (from word ``word_offsets[i]`` of row ``task`` of
    ``words``) into ``acc[i]``. A non-contiguous ``acc`` is updated through a contiguous copy."""
    words = words.contiguous()
    row = words[task]
    grads, work, launches = _launches(acc, grads, word_offsets, words.device)
    for launch in launches:
        g_dtype, a_dtype = launch.group
        _masked_accumulate_kernel[(launch.n_blocks,)](
            launch.table,
            row,
            launch.n_segments,
            G_DTYPE=_utils.TL_DTYPES[g_dtype],
            A_DTYPE=_utils.TL_DTYPES[a_dtype],
            **launch.meta,
        )
    _utils.copy_back(acc, work)


@triton.jit
def _masked_accumulate_tasks_kernel(
    table_ptr,  # int64 [S, 5]: grads pointer ([k, n] contiguous), acc pointer, n, first block, word offset
    words_ptr,  # int32 [T, n_words] packed masks
    n_segments,
    n_words,
    first_task,
    n_tasks,  # k
    LOG_SEGMENTS: tl.constexpr,
    G_DTYPE: tl.constexpr,
    A_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """``acc += S_j * g_j`` for the k tasks in turn, ``acc`` read and written once: each add
    rounds as one :func:`_masked_accumulate_kernel` call does, so the sum has the same bits as k
    calls (k - 1 fewer reads and writes of ``acc``, one launch)."""
    pid = tl.program_id(0).to(tl.int64)
    g_ptr, a_ptr, n, offs, mask, words, word_mask, cols = _utils.pointer_pair_tile(
        table_ptr, n_segments, pid, LOG_SEGMENTS, G_DTYPE, A_DTYPE, BLOCK, ALIGNED
    )
    a = tl.load(a_ptr + offs, mask=mask, other=0.0)
    for j in range(n_tasks):
        w = tl.load(words_ptr + (first_task + j).to(tl.int64) * n_words + words, mask=word_mask, other=0)
        bit = ((w >> cols) & 1).to(A_DTYPE)
        g = tl.load(g_ptr + j * n + offs, mask=mask, other=0.0).to(A_DTYPE)
        a = a + g * bit
    tl.store(a_ptr + offs, a, mask=mask)


def masked_accumulate_tasks_forward(acc, grads, words, word_offsets, first_task) -> None:
    """Kernel of ``torch.ops.fsmtl.masked_accumulate_tasks`` for CUDA tensors (schema arguments):
    ``grads[i]`` is ``[k, *shape_i]``, row ``j`` added with task ``first_task + j``'s bits."""
    num_tasks = grads[0].shape[0]
    if num_tasks == 0:
        return
    words = words.contiguous()
    grads, work, launches = _launches(acc, grads, word_offsets, words.device)
    for launch in launches:
        g_dtype, a_dtype = launch.group
        _masked_accumulate_tasks_kernel[(launch.n_blocks,)](
            launch.table,
            words,
            launch.n_segments,
            words.shape[1],
            first_task,
            num_tasks,
            G_DTYPE=_utils.TL_DTYPES[g_dtype],
            A_DTYPE=_utils.TL_DTYPES[a_dtype],
            **launch.meta,
        )
    _utils.copy_back(acc, work)


# Opaque to torch.compile, as the other ops (data pointers in the segment table).
torch.library.register_kernel("fsmtl::masked_accumulate", "cuda", masked_accumulate_forward)
torch.library.register_kernel("fsmtl::masked_accumulate_tasks", "cuda", masked_accumulate_tasks_forward)
