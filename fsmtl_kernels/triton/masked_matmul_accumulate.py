"""k tasks' masked Linear weight gradients added into a running sum, one fused launch.

``acc[o, i] += sum_{j < k} S_{first_task + j}[o, i] * (a[j] @ b)[o, i]``: each program owns one
``[BLOCK_M, BLOCK_N]`` tile of ``acc``, loads it once, adds every task's product tile
(``tl.dot`` over chunks of ``BLOCK_K`` of the ``n`` axis, operands converted to acc's dtype,
``input_precision="ieee"`` so no TF32 rounding) times the task's mask bits, and stores it once.
Bytes moved: ``acc`` read and written once, ``a`` once per column of tiles and ``b`` once per
task and row of tiles, k mask bits per entry.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _utils


@triton.jit
def _masked_matmul_accumulate_kernel(
    acc_ptr,  # [out, in] running sum (fp32/fp64), contiguous, updated in place
    a_ptr,  # [k, out, n] (fp32/fp64), any strides
    b_ptr,  # [n, in] (a's dtype), any strides
    words_ptr,  # int32 [T, W], contiguous
    n_words,
    word_offset,
    first_task,
    k,
    n_out,
    n_in,
    n_red,
    stride_aj,
    stride_ao,
    stride_an,
    stride_bn,
    stride_bi,
    A_DTYPE: tl.constexpr,  # acc's element type: the product is computed in it
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rk = tl.arange(0, BLOCK_K)
    tile_mask = (rm[:, None] < n_out) & (rn[None, :] < n_in)
    flat = rm[:, None] * n_in + rn[None, :]
    acc_ptrs = acc_ptr + flat
    total = tl.load(acc_ptrs, mask=tile_mask, other=0.0)
    word_idx = word_offset + flat // 32
    shift = (flat % 32).to(tl.int32)
    for j in range(k):
        prod = tl.zeros([BLOCK_M, BLOCK_N], dtype=A_DTYPE)
        for k0 in range(0, n_red, BLOCK_K):
            kk = k0 + rk
            a_mask = (rm[:, None] < n_out) & (kk[None, :] < n_red)
            a = tl.load(
                a_ptr + j * stride_aj + rm[:, None] * stride_ao + kk[None, :] * stride_an, mask=a_mask, other=0.0
            )
            b_mask = (kk[:, None] < n_red) & (rn[None, :] < n_in)
            b = tl.load(b_ptr + kk[:, None] * stride_bn + rn[None, :] * stride_bi, mask=b_mask, other=0.0)
            prod = tl.dot(a.to(A_DTYPE), b.to(A_DTYPE), prod, input_precision="ieee")
        row = (first_task + j).to(tl.int64) * n_words
        w = tl.load(words_ptr + row + word_idx, mask=tile_mask, other=0)
        bit = ((w >> shift) & 1).to(A_DTYPE)
        total = total + prod * bit
    tl.store(acc_ptrs, total, mask=tile_mask)


def masked_matmul_accumulate_forward(acc, a, b, words, word_offset, first_task) -> None:
    """Kernel of ``torch.ops.fsmtl.masked_matmul_accumulate`` for CUDA tensors (schema arguments):
    one launch over the ``[out, in]`` tiles of ``acc`` (contiguous); ``a`` and ``b`` any strides."""
    if not acc.is_contiguous():
        raise ValueError("masked_matmul_accumulate: acc must be contiguous")
    n_out, n_in = acc.shape
    k, _, n_red = a.shape
    if acc.numel() == 0 or k == 0:
        return
    if n_red == 0:
        # Every product is zero: add 0 * bit (no change to finite entries), as the reference does.
        return
    words = words.contiguous()
    block_m, block_n, block_k = _utils.block_size("linear")
    if not _utils.is_interpreter():
        # Two float32 tiles per program (the sum and a task's product, FMA path): compiled for sm_90
        # (triton 3.9), 64 x 64 tiles with 8 warps hold them in registers (48 bytes of stack), where
        # 128 x 128 tiles spilled 2720 bytes and 64 x 64 with 4 warps 1320.
        block_m, block_n = min(block_m, 64), min(block_n, 64)
    grid = (_utils.cdiv(n_out, block_m), _utils.cdiv(n_in, block_n))
    _masked_matmul_accumulate_kernel[grid](
        acc,
        a,
        b,
        words,
        words.shape[1],
        word_offset,
        first_task,
        k,
        n_out,
        n_in,
        n_red,
        a.stride(0),
        a.stride(1),
        a.stride(2),
        b.stride(0),
        b.stride(1),
        A_DTYPE=_utils.TL_DTYPES[acc.dtype],
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=8 if block_m * block_n >= 64 * 64 else 4,
    )


torch.library.register_kernel("fsmtl::masked_matmul_accumulate", "cuda", masked_matmul_accumulate_forward)
