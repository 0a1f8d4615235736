"""Fused masked multi-task gradient average (paper Eq. 4 / the shared update of Eq. 12).

``out_i = sum_t S_ti * g_ti / T`` (``normalize="tasks"``) or ``/ sum_t S_ti`` (``"selected"``,
0 where no task selected the entry), summed in float32 over the T tasks inside the kernel: one
launch over all parameters, no Python loop over tasks or parameters. Bytes moved: one read of
the gradients (``T * P * itemsize``), of the packed masks (``T * P / 8``) and one write of the
output (``P * out_itemsize``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _utils


@triton.jit
def _masked_grad_average_kernel(
    table_ptr,  # int64 [S, 5]: grads pointer ([T, n] contiguous), out pointer, n, first block, word offset
    words_ptr,  # int32 [T, n_words] packed masks
    n_segments,  # rows of the table
    n_tasks,  # T
    n_words,  # words per task
    SELECTED: tl.constexpr,  # True: divide by the selected count; False: divide by T
    LOG_SEGMENTS: tl.constexpr,
    G_DTYPE: tl.constexpr,  # gradient element type (fp16/bf16/fp32)
    O_DTYPE: tl.constexpr,  # output element type (fp16/bf16/fp32/fp64)
    BLOCK: tl.constexpr,  # entries per program, a multiple of 32
    ALIGNED: tl.constexpr,  # pointers 16-byte aligned and sizes multiples of 8 (vector loads)
):
    pid = tl.program_id(0).to(tl.int64)
    g_ptr, o_ptr, n, offs, mask, word_idx, word_mask, cols = _utils.pointer_pair_tile(
        table_ptr, n_segments, pid, LOG_SEGMENTS, G_DTYPE, O_DTYPE, BLOCK, ALIGNED
    )
    # A [BLOCK // 32, 32] tile: each row's mask word is loaded once per task, its bits by shifts.
    acc = tl.zeros([BLOCK // 32, 32], dtype=tl.float32)
    count = tl.zeros([BLOCK // 32, 32], dtype=tl.int32)
    for t in range(n_tasks):
        w = tl.load(words_ptr + t * n_words + word_idx, mask=word_mask, other=0)
        bit = (w >> cols) & 1
        # Multiplying by the bit (as the reference's ``g * S`` does, inf * 0 included) rather than
        # masking the load keeps the load mask constant over 16-byte groups (vector loads).
        g = tl.load(g_ptr + t * n + offs, mask=mask, other=0.0).to(tl.float32)
        acc += g * bit.to(tl.float32)
        count += bit
    if SELECTED:
        avg = tl.where(count > 0, acc / tl.maximum(count, 1).to(tl.float32), 0.0)
    else:
        avg = acc / n_tasks
    tl.store(o_ptr + offs, avg.to(O_DTYPE), mask=mask)


def masked_grad_average_forward(grads, words, word_offsets, normalize, out) -> None:
    """Kernel of ``torch.ops.fsmtl.masked_grad_average`` for CUDA tensors (schema arguments):
    the masked average of ``grads`` (``[T, *shape_i]``) into ``out`` (``shape_i``), parameter
    ``i``'s mask bits from word ``word_offsets[i]`` of ``words`` (``[T, W]`` int32).

    One launch per (gradient dtype, output dtype, alignment class), normally one or two. A
    non-contiguous ``out`` tensor is written through a contiguous buffer and copied back.
    """
    num_tasks, n_words = words.shape
    words = words.contiguous()
    grads = [g.contiguous() for g in grads]
    work = _utils.writable(out, keep_values=False)
    segments = [
        _utils.Segment((g.data_ptr(), w.data_ptr()), w.numel(), (offset,), (g.dtype, w.dtype))
        for g, w, offset in zip(grads, work, word_offsets, strict=True)
    ]
    block = _utils.block_size("average", max(o.numel() for o in out))
    for launch in _utils.segment_launches(segments, block, words.device):
        g_dtype, o_dtype = launch.group
        _masked_grad_average_kernel[(launch.n_blocks,)](
            launch.table,
            words,
            launch.n_segments,
            num_tasks,
            n_words,
            SELECTED=normalize == "selected",
            G_DTYPE=_utils.TL_DTYPES[g_dtype],
            O_DTYPE=_utils.TL_DTYPES[o_dtype],
            **launch.meta,
        )
    _utils.copy_back(out, work)


# Opaque to torch.compile, as fisher_accumulate (data pointers in the segment table).
torch.library.register_kernel("fsmtl::masked_grad_average", "cuda", masked_grad_average_forward)
