"""``masked_accumulate``: one task's gradient added into a running masked sum (streaming Eq. 4).

``acc_i += S_t,i * g_t,i`` for every parameter ``i`` of task ``t``: called once per task as each
task's gradient arrives, it builds ``sum_t S_t * g_t`` without ever holding the T gradients
(``[T, P]``) at once. The caller divides by T (or by the per-entry selected count) at the end.

The op ``torch.ops.fsmtl.masked_accumulate`` is defined here once; its kernels are
``csrc/masked_accumulate.cpp`` (CPU) and :mod:`fsmtl_kernels.triton.masked_accumulate` (CUDA),
both reading row ``task`` of the mask's words at the ``word_offsets`` the :class:`PackedMask`
computed. :func:`fsmtl_kernels.reference.masked_accumulate` defines the semantics.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import _checks, backends, reference
from .packed_mask import PackedMask

#: dtypes of the running sums: a sum of T terms, so never below float32.
ACC_DTYPES = (torch.float32, torch.float64)

torch.library.define(
    "fsmtl::masked_accumulate",
    "(Tensor(a!)[] acc, Tensor[] grads, Tensor words, int[] word_offsets, int task) -> ()",
)


@torch.library.register_fake("fsmtl::masked_accumulate")
def _(acc, grads, words, word_offsets, task):
    return None


# k tasks in one call: grads[i] is [k, *shape_i], row j task first_task + j (a chunk of tasks from one
# batched backward). No public function: the masked backward calls it through
# fsmtl_kernels.unchecked_kernel. Its CPU kernel is the reference (k masked_accumulate calls).
torch.library.define(
    "fsmtl::masked_accumulate_tasks",
    "(Tensor(a!)[] acc, Tensor[] grads, Tensor words, int[] word_offsets, int first_task) -> ()",
)
torch.library.register_kernel("fsmtl::masked_accumulate_tasks", "cpu", reference.masked_accumulate_tasks)


@torch.library.register_fake("fsmtl::masked_accumulate_tasks")
def _(acc, grads, words, word_offsets, first_task):
    return None


def masked_accumulate(
    acc: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    mask: PackedMask,
    task: int,
    *,
    backend: str = "auto",
) -> list[torch.Tensor]:
    """Add task ``task``'s masked gradient into ``acc``: ``acc_i += S_task,i * g_i``, in place.

    Each ``g_i`` is converted to ``acc_i``'s dtype, multiplied by the mask bit (0 or 1, so the
    product is exact; an inf or NaN outside the mask gives NaN, as in
    :func:`masked_grad_average`) and added with one rounding: every backend gives the same bits.

    Args:
        acc: running sums (float32 or float64), shaped like the mask's parameters; modified.
        grads: task ``task``'s gradients (fp16/bf16/fp32/fp64), shaped like ``acc``.
        mask: a :class:`PackedMask` over parameters of those shapes.
        task: which task's mask applies, ``0 <= task < mask.num_tasks``.
        backend: ``"auto" | "reference" | "triton" | "cpp"``.

    Returns:
        ``acc`` (the same tensors).
    """
    acc = _checks.tensor_list(acc, "acc")
    items = _checks.tensor_list(grads, "grads")
    _checks.floating(acc, "acc", ACC_DTYPES)
    _checks.floating(items, "grads", _checks.PARAM_DTYPES)
    if not isinstance(mask, PackedMask):
        raise TypeError(f"mask must be a PackedMask, got {type(mask).__name__}")
    if isinstance(task, bool) or not isinstance(task, int):
        raise TypeError(f"task must be an int, got {type(task).__name__}")
    if not 0 <= task < mask.num_tasks:
        raise ValueError(f"task={task} is out of range for a mask of {mask.num_tasks} task(s)")
    _checks.same_length(acc, "acc", items, "grads")
    _checks.same_device(acc, "acc", items, "grads")
    if len(acc) != len(mask.shapes):
        raise ValueError(f"acc has {len(acc)} entries but mask covers {len(mask.shapes)} parameters")
    if mask.device != acc[0].device:
        raise ValueError(f"mask is on {mask.device} but acc is on {acc[0].device}")
    for i, (a, g, shape) in enumerate(zip(acc, items, mask.shapes)):
        if a.shape != shape:
            raise ValueError(f"acc[{i}] has shape {tuple(a.shape)}; mask expects {tuple(shape)}")
        if g.shape != shape:
            raise ValueError(f"grads[{i}] has shape {tuple(g.shape)}; mask expects {tuple(shape)}")
    run = backends.kernel("masked_accumulate", backend, acc[0].device)
    run(acc, items, mask.words, mask.word_offsets, task)
    return acc
