"""``masked_matmul_accumulate``: k tasks' Linear weight gradients, masked, added into a running sum.

``acc[o, i] += sum_{j < k} S_{first_task + j}[o, i] * (a[j] @ b)[o, i]``: ``a[j]`` is task
``first_task + j``'s transposed output gradient ``G^T`` (``[out, n]``) and ``b`` the layer input
``X`` (``[n, in]``), so ``a[j] @ b`` is that task's weight gradient. Fusing the GEMM with the
masked add keeps the running sum in cache (the C++ kernel walks it in row blocks of ~256 KiB and
adds every task's product to a block before moving on) and never holds the k gradients at once.

The op ``torch.ops.fsmtl.masked_matmul_accumulate`` is defined here once; its kernels are
``csrc/masked_matmul_accumulate.cpp`` (CPU) and :mod:`fsmtl_kernels.triton.masked_matmul_accumulate`
(CUDA), both reading rows ``first_task .. first_task + k - 1`` of the mask's words from the
weight's word offset. :func:`fsmtl_kernels.reference.masked_matmul_accumulate` defines the semantics.
"""

from __future__ import annotations

import torch

from . import backends
from .packed_mask import PackedMask

#: dtypes of the running sum and of the operands (the product is computed in acc's dtype).
ACC_DTYPES = (torch.float32, torch.float64)
OPERAND_DTYPES = (torch.float32, torch.float64)

torch.library.define(
    "fsmtl::masked_matmul_accumulate",
    "(Tensor(a!) acc, Tensor a, Tensor b, Tensor words, int word_offset, int first_task) -> ()",
)


@torch.library.register_fake("fsmtl::masked_matmul_accumulate")
def _(acc, a, b, words, word_offset, first_task):
    return None


def _int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return value


def masked_matmul_accumulate(
    acc: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    mask: PackedMask,
    param_index: int,
    first_task: int = 0,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """``acc += sum_j S_{first_task + j} * (a[j] @ b)`` in place, for the weight ``param_index`` of ``mask``.

    Each product ``a[j] @ b`` is computed in ``acc``'s dtype (``a`` and ``b`` upcast when needed),
    multiplied by the 0/1 mask bit (so an inf or NaN outside the mask gives NaN, as in
    :func:`masked_accumulate`) and added, task after task.

    Args:
        acc: running sum (float32 or float64, contiguous), ``[out, in]``; modified.
        a: ``[k, out, n]`` (float32 or float64): the k tasks' transposed output gradients.
        b: ``[n, in]`` (a's dtype): the layer input.
        mask: a :class:`PackedMask`; its parameter ``param_index`` has ``acc``'s shape.
        param_index: which of the mask's parameters ``acc`` is.
        first_task: the task of ``a[0]``; ``0 <= first_task`` and ``first_task + k <= mask.num_tasks``.
        backend: ``"auto" | "reference" | "triton" | "cpp"``.

    Returns:
        ``acc`` (the same tensor).
    """
    for name, t in (("acc", acc), ("a", a), ("b", b)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not isinstance(mask, PackedMask):
        raise TypeError(f"mask must be a PackedMask, got {type(mask).__name__}")
    param_index = _int(param_index, "param_index")
    first_task = _int(first_task, "first_task")
    if acc.dtype not in ACC_DTYPES:
        raise TypeError(f"acc has dtype {acc.dtype}; expected float32 or float64")
    if a.dtype not in OPERAND_DTYPES:
        raise TypeError(f"a has dtype {a.dtype}; expected float32 or float64")
    if b.dtype != a.dtype:
        raise TypeError(f"b has dtype {b.dtype} but a has {a.dtype}; they must match")
    if acc.dim() != 2:
        raise ValueError(f"acc must be 2-D [out, in], got shape {tuple(acc.shape)}")
    if not acc.is_contiguous():
        raise ValueError("acc must be contiguous")
    if a.dim() != 3:
        raise ValueError(f"a must be 3-D [k, out, n], got shape {tuple(a.shape)}")
    if b.dim() != 2:
        raise ValueError(f"b must be 2-D [n, in], got shape {tuple(b.shape)}")
    out, n_in = acc.shape
    k = a.shape[0]
    if a.shape[1] != out:
        raise ValueError(f"a has shape {tuple(a.shape)}; a.shape[1] must be acc's {out} rows")
    if a.shape[2] != b.shape[0]:
        raise ValueError(f"b has shape {tuple(b.shape)}; b.shape[0] must be a.shape[2] = {a.shape[2]}")
    if b.shape[1] != n_in:
        raise ValueError(f"b has shape {tuple(b.shape)}; b.shape[1] must be acc's {n_in} columns")
    if not 0 <= param_index < len(mask.shapes):
        raise ValueError(f"param_index={param_index} is out of range for a mask of {len(mask.shapes)} parameter(s)")
    if mask.shapes[param_index] != acc.shape:
        raise ValueError(
            f"acc has shape {tuple(acc.shape)}; mask parameter {param_index} has {tuple(mask.shapes[param_index])}"
        )
    if first_task < 0 or first_task + k > mask.num_tasks:
        raise ValueError(
            f"first_task={first_task} with k={k} tasks is out of range for a mask of {mask.num_tasks} task(s)"
        )
    if a.device != acc.device:
        raise ValueError(f"a is on {a.device} but acc is on {acc.device}")
    if b.device != acc.device:
        raise ValueError(f"b is on {b.device} but acc is on {acc.device}")
    if mask.device != acc.device:
        raise ValueError(f"mask is on {mask.device} but acc is on {acc.device}")
    run = backends.kernel("masked_matmul_accumulate", backend, acc.device)
    run(acc, a, b, mask.words, mask.word_offsets[param_index], first_task)
    return acc
