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
    seg = _utils.find_segment(table_ptr + 3, 5, n_segments, pid, LOG_SEGMENTS)
    row = table_ptr + seg * 5
    g_ptr = tl.load(row).to(tl.pointer_type(G_DTYPE))
    o_ptr = tl.load(row + 1).to(tl.pointer_type(O_DTYPE))
    n = tl.load(row + 2)
    first = tl.load(row + 3)
    word_off = tl.load(row + 4)
    if ALIGNED:
        g_ptr = tl.multiple_of(g_ptr, 16)
        o_ptr = tl.multiple_of(o_ptr, 16)
        n = tl.multiple_of(n, 8)
    offs = (pid - first) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    word_idx = word_off + offs // 32
    shift = (offs % 32).to(tl.int32)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    count = tl.zeros([BLOCK], dtype=tl.int32)
    for t in range(n_tasks):
        # Each word is gathered by its 32 entries; they hit the same cache line.
        w = tl.load(words_ptr + t * n_words + word_idx, mask=mask, other=0)
        bit = (w >> shift) & 1
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


def masked_grad_average_forward(
    grads: list[torch.Tensor], words: torch.Tensor, normalize: str, out: list[torch.Tensor]
) -> None:
    """Write the masked average of ``grads`` (``[T, *shape_i]``) into ``out`` (``shape_i``).

    One launch per (gradient dtype, output dtype, alignment class), normally one or two. A non-contiguous
    ``out`` tensor is written through a contiguous buffer and copied back.
    """
    block = _utils.block_size("average", max(o.numel() for o in out))
    device = words.device
    num_tasks, n_words = words.shape
    groups: dict[tuple[torch.dtype, torch.dtype, bool], list] = {}
    word_off = 0
    for g, o in zip(grads, out, strict=True):
        n = o.numel()
        if n:
            work = o if o.is_contiguous() else torch.empty(o.shape, dtype=o.dtype, device=o.device)
            g = g.contiguous()
            aligned = _utils.is_aligned((g.data_ptr(), work.data_ptr()), n)
            groups.setdefault((g.dtype, o.dtype, aligned), []).append((g, o, work, word_off))
        word_off += triton.cdiv(n, 32)
    words = words.contiguous()
    for (g_dtype, o_dtype, aligned), items in groups.items():
        starts, total_blocks = _utils.block_starts([o.numel() for _, o, _, _ in items], block)
        rows = [
            (g.data_ptr(), w.data_ptr(), w.numel(), s, off) for (g, _, w, off), s in zip(items, starts, strict=True)
        ]
        table = _utils.segment_table(rows, device)
        _masked_grad_average_kernel[(total_blocks,)](
            table,
            words,
            len(rows),
            num_tasks,
            n_words,
            SELECTED=normalize == "selected",
            LOG_SEGMENTS=_utils.log2_ceil(len(rows)),
            G_DTYPE=_utils.TL_DTYPES[g_dtype],
            O_DTYPE=_utils.TL_DTYPES[o_dtype],
            BLOCK=block,
            ALIGNED=aligned,
            num_warps=_utils.num_warps(block),
        )
        for _, o, work, _ in items:
            if work is not o:
                o.copy_(work)


@torch.library.custom_op(
    "fsmtl_triton::masked_grad_average",
    mutates_args=("out",),
    schema="(Tensor[] grads, Tensor words, str normalize, Tensor(a!)[] out) -> ()",
)
def masked_grad_average_op(grads, words, normalize, out):
    # custom_op, not triton_op: the segment table holds data pointers (see fisher_accumulate.py).
    masked_grad_average_forward(list(grads), words, normalize, list(out))


@masked_grad_average_op.register_fake
def _(grads, words, normalize, out):
    return None
