"""The masked multi-task backward of a model sharded with FSDP2 (``MultiTaskModel.shard``).

FSDP2 all-gathers each group's parameters for its forward and backward and reduce-scatters their
gradients; ``autograd.grad`` with respect to the sharded parameters is not defined (the forward
used the unsharded copies). So the T task gradients are never formed as tensors here: the step runs
T backward passes over the retained graph with FSDP's gradient synchronisation and its reshard
after backward off until the last one, and a gradient hook on each unsharded trunk parameter the
forward used (:attr:`ForwardRecord.unsharded`) turns task t's gradient into its share of Eq. 4
before autograd accumulates it: ``S_t * g_t / T`` (or divided per entry by the number of tasks
holding it) for masked parameters, ``g_t / T`` for the other trunk parameters. Heads accumulate
their own task's gradient. The last pass reduce-scatters the accumulated sums: one reduce-scatter
per FSDP group per step, as a plain FSDP2 backward. Memory: the full packed masks (``T x P`` bits)
and, per hook call, one parameter's mask unpacked.

Updating the tasks in turns (:func:`sharded_task_backward`) needs no hook: each task's update is a
plain FSDP2 backward of its loss (one reduce-scatter per group, as each of T plain steps), and
masking commutes with the reduction (``sum_r S_t * g_r = S_t * sum_r g_r``, entry by entry, bit
for bit), so each rank masks its reduced gradient shard with its rows of ``S_t``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

import fsmtl_kernels as fk
from fsmtl_kernels.packed_mask import unpack_bits

from .record import ForwardRecord


def sharded_masked_backward(
    model,
    losses: Sequence[torch.Tensor],
    mask: fk.PackedMask,
    record: ForwardRecord,
    *,
    normalize: str = "tasks",
) -> None:
    """Write the sharded ``.grad`` of a masked multi-task update (Eq. 4) of ``model`` (sharded
    with FSDP2; ``model`` is its root) from the T losses of one shared forward that filled
    ``record``."""
    losses = list(losses)
    num_tasks = len(losses)
    if normalize not in fk.NORMALIZE_MODES:
        raise ValueError(f"normalize must be one of {fk.NORMALIZE_MODES}, got {normalize!r}")
    if mask.num_tasks != num_tasks:
        raise ValueError(f"mask has {mask.num_tasks} tasks but there are {num_tasks} losses")
    if not record.unsharded:
        raise ValueError("the record holds no unsharded parameter: pass it to the step's forward (record=...)")
    names = model.masked_parameter_names()
    index = {n: i for i, n in enumerate(names)}
    offsets, numels = mask.word_offsets, mask.numels
    counts = mask.task_counts() if normalize == "selected" else None
    current = {"task": 0}

    def masked_hook(i: int):
        words = mask.words[:, offsets[i] : offsets[i] + -(-numels[i] // 32)]
        shape = mask.shapes[i]

        def hook(grad: torch.Tensor) -> torch.Tensor:
            bits = unpack_bits(words[current["task"] : current["task"] + 1], numels[i])[0].reshape(shape)
            kept = torch.where(bits, grad, torch.zeros((), dtype=grad.dtype, device=grad.device))
            if counts is None:
                return kept / num_tasks
            count = counts[i].to(grad.dtype)
            return torch.where(counts[i] > 0, kept / count.clamp_min(1), torch.zeros((), dtype=grad.dtype))

        return hook

    def dense_hook(grad: torch.Tensor) -> torch.Tensor:
        return grad / num_tasks

    handles = []
    for name, tensor in record.unsharded.items():
        if tensor.requires_grad:
            handles.append(tensor.register_hook(masked_hook(index[name]) if name in index else dense_hook))
    try:
        for t, loss in enumerate(losses):
            last = t == num_tasks - 1
            model.set_requires_gradient_sync(last)  # reduce-scatter once, after the last pass
            model.set_reshard_after_backward(last)  # keep the gathered parameters for the next pass
            current["task"] = t
            loss.backward(retain_graph=not last)
    finally:
        for h in handles:
            h.remove()
        model.set_requires_gradient_sync(True)
        model.set_reshard_after_backward(True)


def sharded_task_backward(model, loss: torch.Tensor, task_mask: Sequence[torch.Tensor] | None) -> None:
    """Write the sharded ``.grad`` of one task's own update in turns on ``model`` (sharded with
    FSDP2): ``S_t * g_t`` on the masked trunk parameters (``g_t`` when ``task_mask`` is None),
    ``g_t`` on the densely shared ones and on the task's head (the only head its loss reaches).

    ``task_mask``: one full-size bool tensor per masked trunk parameter (``S_t``'s rows), the same
    on every rank; each rank keeps the part that matches its gradient shard."""
    loss.backward()
    if task_mask is None:
        return
    with torch.no_grad():
        for p, keep in zip(model.masked_parameters(), task_mask, strict=True):
            if p.grad is not None:
                local = p.grad.to_local()
                local.masked_fill_(~local_rows(keep, p), 0)


def local_rows(full: torch.Tensor, param) -> torch.Tensor:
    """This rank's part of ``full`` (shaped like the DTensor ``param``), as FSDP2 shards
    ``param`` on dim 0: ``torch.chunk`` over the mesh, ranks past the last chunk holding none."""
    from torch.distributed.tensor import Shard

    if tuple(param.placements) != (Shard(0),):
        raise ValueError(f"expected a parameter sharded on dim 0 over one mesh dimension, got {param.placements}")
    mesh = param.device_mesh
    chunks = torch.chunk(full, mesh.size(), dim=0)
    rank = mesh.get_local_rank()
    part = chunks[rank] if rank < len(chunks) else full.new_empty((0, *full.shape[1:]))
    expected = param.to_local().shape
    if part.shape != expected:
        raise ValueError(f"the mask's local part has shape {tuple(part.shape)}, the local shard {tuple(expected)}")
    return part.to(param.device)
