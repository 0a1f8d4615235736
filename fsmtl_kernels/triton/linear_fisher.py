"""Fisher of a Linear layer without per-sample gradients: a matmul that squares on load.

The per-sample weight gradient of ``y = W a + b`` is ``g_n a_n^T``, so
``sum_n (g_n a_n^T)**2 = (g*g)^T (a*a)`` and the bias term is ``sum_n g_n**2`` (paper Eq. 10 for
a Linear layer). One kernel computes both: tile ``[BLOCK_M, BLOCK_N]`` of the ``[out, in]``
Fisher accumulates ``tl.dot(g_tile**2, a_tile**2)`` over the samples in float32 (operands upcast
and squared in registers, ``input_precision="ieee"`` so no TF32 rounding), and the programs of
the first column of tiles also sum ``g**2`` over the samples for the bias. Bytes moved: the two
operands once per tile row/column plus a read and a write of the Fisher; it is compute-bound for
``N`` above a few hundred.

On the GPU the products run on the tensor cores as three TF32 products (``tf32x3``: the operands
split into a TF32 head and a TF32 tail, the tail-times-tail term dropped), about float32's
accuracy: on an H100 the float32 FMA path (``ieee``, 64 x 64 tiles) took 4.4 ms at 4096^3 where
cuBLAS's float32 GEMM on the squared operands took 2.9 ms (triton 3.6). :data:`GPU_OPTIONS` holds the GPU
settings (``benchmarks/gpu_bandwidth.py`` times the alternatives); their speed on a GPU has not
been measured yet.

Registered as the CUDA kernel of the one ``torch.ops.fsmtl.linear_fisher`` schema (an opaque op
under ``torch.compile``, like the other three).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _utils

#: GPU settings: ``precision`` of ``tl.dot`` ("tf32x3" or "ieee"), ``steps`` of ``BLOCK_K`` samples
#: summed in one dot accumulator before the compensated add, warps and pipeline stages. Under the
#: interpreter: one step, 4 warps (the interpreter computes every precision in float32).
#: Compiled for sm_90 (triton 3.9, cuobjdump): 128 x 128 tiles spill least with one step per
#: compensated add and 2 stages (304 bytes of stack; 4 steps and 3 stages: 1384).
GPU_OPTIONS = {"precision": "tf32x3", "steps": 1, "num_warps": 8, "num_stages": 2}


@triton.jit
def _linear_fisher_kernel(
    g_ptr,  # [N, out] grad_output (fp16/bf16/fp32), any strides
    a_ptr,  # [N, in] inputs (fp16/bf16/fp32), any strides
    wf_ptr,  # float32 [out, in] weight Fisher, updated in place
    bf_ptr,  # float32 [out] bias Fisher, updated in place (ignored without HAS_BIAS)
    n_samples,
    n_out,
    n_in,
    stride_gn,
    stride_go,
    stride_an,
    stride_ai,
    stride_wo,
    stride_wi,
    stride_b,
    scale,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,  # rows of the tile (output features)
    BLOCK_N: tl.constexpr,  # columns of the tile (input features)
    BLOCK_K: tl.constexpr,  # samples per step
    STEPS: tl.constexpr,  # steps summed in the dot's accumulator before the compensated add
    PRECISION: tl.constexpr,  # tl.dot input precision
):
    """``WF[m, i] += scale * sum_n g[n, m]**2 * a[n, i]``; ``BF[m] += scale * sum_n g[n, m]**2``."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    carry = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)  # Kahan compensation of acc
    zero = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32) + scale * 0.0
    bias_acc = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(0, n_samples, BLOCK_K * STEPS):
        # Each chunk of STEPS * BLOCK_K samples is summed from zero and added with Kahan
        # compensation, so the float32 sum over n samples rounds like one chunk, not n terms (a
        # sequential sum of 1000 squares had 7x cuBLAS's error on an H100). The chunk's zero start
        # is ``scale * 0``, not a constant: Triton folds ``dot(g, a, 0) + acc`` into ``dot(g, a, acc)``.
        chunk = zero
        for step in tl.static_range(STEPS):
            kk = k0 + step * BLOCK_K + rk
            g_mask = (rm[:, None] < n_out) & (kk[None, :] < n_samples)
            g = tl.load(g_ptr + rm[:, None] * stride_go + kk[None, :] * stride_gn, mask=g_mask, other=0.0)
            g = g.to(tl.float32)
            g = g * g
            a_mask = (kk[:, None] < n_samples) & (rn[None, :] < n_in)
            a = tl.load(a_ptr + kk[:, None] * stride_an + rn[None, :] * stride_ai, mask=a_mask, other=0.0)
            a = a.to(tl.float32)
            a = a * a
            chunk = tl.dot(g, a, chunk, input_precision=PRECISION)
            if HAS_BIAS:
                bias_acc += tl.sum(g, axis=1)
        chunk = chunk - carry
        total = acc + chunk
        carry = (total - acc) - chunk
        carry = tl.where(carry == carry, carry, 0.0)  # an inf sum stays inf, not NaN
        acc = total
    w_mask = (rm[:, None] < n_out) & (rn[None, :] < n_in)
    w_ptrs = wf_ptr + rm[:, None] * stride_wo + rn[None, :] * stride_wi
    tl.store(w_ptrs, tl.load(w_ptrs, mask=w_mask, other=0.0) + scale * acc, mask=w_mask)
    if HAS_BIAS:
        # Only the first column of tiles writes the bias (every column computed the same sums).
        b_mask = rm < tl.where(pid_n == 0, n_out, 0)
        b_ptrs = bf_ptr + rm * stride_b
        tl.store(b_ptrs, tl.load(b_ptrs, mask=b_mask, other=0.0) + scale * bias_acc, mask=b_mask)


def linear_fisher_forward(grad_output, inputs, weight_fisher, bias_fisher, scale) -> None:
    """Kernel of ``torch.ops.fsmtl.linear_fisher`` for CUDA tensors (schema arguments): one launch
    over the ``[out, in]`` tiles (see the module docstring); any strides."""
    n_samples, n_out = grad_output.shape
    n_in = inputs.shape[1]
    if n_out == 0 or n_in == 0:
        if bias_fisher is not None and n_out and n_samples:
            bias_fisher.add_(grad_output.float().square().sum(0), alpha=scale)
        return
    block_m, block_n, block_k = _utils.block_size("linear")
    if _utils.is_interpreter():
        options = {"precision": "ieee", "steps": 1, "num_warps": 4, "num_stages": 1}
    else:
        options = GPU_OPTIONS
    has_bias = bias_fisher is not None
    bias = bias_fisher if has_bias else weight_fisher
    grid = (_utils.cdiv(n_out, block_m), _utils.cdiv(n_in, block_n))
    _linear_fisher_kernel[grid](
        grad_output,
        inputs,
        weight_fisher,
        bias,
        n_samples,
        n_out,
        n_in,
        grad_output.stride(0),
        grad_output.stride(1),
        inputs.stride(0),
        inputs.stride(1),
        weight_fisher.stride(0),
        weight_fisher.stride(1),
        bias.stride(0),
        scale,
        HAS_BIAS=has_bias,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        STEPS=options["steps"],
        PRECISION=options["precision"],
        num_warps=options["num_warps"],
        num_stages=options["num_stages"],
    )


torch.library.register_kernel("fsmtl::linear_fisher", "cuda", linear_fisher_forward)
