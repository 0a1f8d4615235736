"""The process group as the core of FSMTL sees it: which rank this is, and the two collectives a
mask update makes on several ranks (gloo on CPU, NCCL on CUDA). Each rank scores its share of the
Fisher samples; :func:`reduce_scores` sums the weighted scores with one ``all_reduce``, every rank
takes the same deterministic top-K, and :func:`check_identical` compares a checksum of the masks
across ranks. In a single process every function here is a no-op."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

_entered = 0


def entered() -> None:
    """Count one collective this process enters (the step's all-reduces, a mask update's): a rank
    whose count stays behind the others' is the one that hangs (:mod:`fsmtl.run.launcher`)."""
    global _entered
    _entered += 1


def collectives_entered() -> int:
    """How many collectives this process has entered."""
    return _entered


def world(group=None) -> tuple[int, int] | None:
    """``(rank, world_size)`` when a process group with more than one rank is initialized, else None."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    size = dist.get_world_size(group)
    return (dist.get_rank(group), size) if size > 1 else None


def world_size() -> int:
    """Ranks in the default process group (1 when none is initialized)."""
    w = world()
    return 1 if w is None else w[1]


def is_main_process() -> bool:
    """True on rank 0 and in a single process: the one that writes files and shows progress."""
    w = world()
    return w is None or w[0] == 0


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if world() is not None:
        dist.barrier()


def rank_prefix() -> str:
    """``"[rank r/W] "`` for log lines in a multi-process run, ``""`` otherwise."""
    w = world()
    return f"[rank {w[0]}/{w[1]}] " if w is not None else ""


def reduce_scores(per_task: list[list[torch.Tensor]], counts: Sequence[int], group=None) -> list[list[torch.Tensor]]:
    """Scores of the union of the ranks' samples: ``sum_r n_r * s_r / sum_r n_r`` per task, with
    one all-reduce over one flat float32 buffer (scores of all tasks, then the counts)."""
    if world(group) is None:
        return per_task
    shapes = [[s.shape for s in task] for task in per_task]
    device = per_task[0][0].device
    weights = torch.tensor(counts, dtype=torch.float32, device=device)
    flat = torch.cat([torch.cat([s.reshape(-1).float() for s in task]) * w for task, w in zip(per_task, weights)])
    flat = torch.cat([flat, weights])
    entered()
    dist.all_reduce(flat, group=group)
    totals = flat[-len(per_task) :]
    out, offset = [], 0
    for t, task_shapes in enumerate(shapes):
        scores = []
        for shape in task_shapes:
            n = shape.numel()
            scores.append((flat[offset : offset + n] / totals[t]).view(shape))
            offset += n
        out.append(scores)
    return out


def mask_checksum(words: torch.Tensor) -> int:
    """A position-weighted int64 checksum of packed mask words (wraps around; deterministic)."""
    w = words.reshape(-1).to(torch.int64) & 0xFFFFFFFF
    pos = torch.arange(1, w.numel() + 1, dtype=torch.int64, device=w.device)
    return int(((w * (pos * 2654435761 % 2147483647 + 1)) & 0x7FFFFFFFFFFF).sum())


def check_identical(mask, group=None) -> None:
    """Raise ``RuntimeError`` when ``mask`` (a ``PackedMask``) differs between ranks, by one
    all-reduce (MAX) of ``[checksum, -checksum]``."""
    w = world(group)
    if w is None:
        return
    c = mask_checksum(mask.words)
    buf = torch.tensor([c, -c], dtype=torch.int64, device=mask.words.device)
    entered()
    dist.all_reduce(buf, op=dist.ReduceOp.MAX, group=group)
    if int(buf[0]) != -int(buf[1]):
        raise RuntimeError(
            f"{rank_prefix()}the task masks differ between ranks (checksum {c} here, max {int(buf[0])}, "
            f"min {-int(buf[1])}): Fisher buffers or top-K were not identical"
        )


def run_record() -> dict:
    """``{"distributed": {"world_size": W, "backend": ...}}`` for results.json in a multi-process
    run; ``{}`` in a single process (whose results stay as they were)."""
    w = world()
    return {} if w is None else {"distributed": {"world_size": w[1], "backend": dist.get_backend()}}


def broadcast_buffers(module: torch.nn.Module, group=None) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank, as DDP's
    ``broadcast_buffers``: each rank updates them on its own data, so they drift apart."""
    if world(group) is None:
        return
    for buffer in module.buffers():
        dist.broadcast(buffer, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
