"""How the T per-task gradients of one shared trunk forward are taken: T backward passes, or
batched vector-Jacobian products (``is_grads_batched``) over chunks of tasks, and the rule that
chooses between them."""

from __future__ import annotations

from collections.abc import Sequence

import torch

#: Below this many entries (parameters and boundary) one batched product beats T backward calls
#: on CPU: digits MLP 64-128-128 (25,864 entries, T = 8): batched 5.2 ms, sequential 6.1 ms; an MLP
#: of 1.4M and a CNN of 1.1M parameters: sequential 1.1-1.7x faster (benchmarks/step_table.py).
AUTO_BATCHED_MAX_ENTRIES = 1 << 17


def auto_batched(inputs: Sequence[torch.Tensor]) -> bool:
    """The rule of ``batched="auto"``: batched vector-Jacobian products for small models (at most
    :data:`AUTO_BATCHED_MAX_ENTRIES` entries, where the T calls' fixed costs dominate), T
    backward passes otherwise. Measured in benchmarks/step_table.py at T = 2, 8, 40: on CPU,
    batching takes 1.1-1.7x the time of T passes for an MLP of 1.4M and a CNN of 1.1M parameters
    (and holds T times the activation gradients); on an H100 1.3-2.1x (MLP) and 1.05-1.4x (CNN),
    since the memory bound ``P + T x largest`` allows only small task chunks."""
    return sum(x.numel() for x in inputs) <= AUTO_BATCHED_MAX_ENTRIES


class MeasuredBatching:
    """``batched=`` choice that times both modes once and keeps the faster: the first masked
    backward for given input shapes, T and device runs the batched mode, then the sequential one
    (whose gradients are used), and later calls with the same key take the faster. The two modes
    may differ in the last bits, so the choice can change results between runs; keep one instance
    for a training run (a sparse strategy built with ``batched_grads="measure"`` holds one)."""

    def __init__(self) -> None:
        #: (input shapes, T, device) -> True where the batched product was faster.
        self.choices: dict[tuple, bool] = {}

    @staticmethod
    def key(inputs: Sequence[torch.Tensor], num_tasks: int) -> tuple:
        return tuple(tuple(x.shape) for x in inputs), num_tasks, inputs[0].device


def task_chunk(numels: Sequence[int], num_tasks: int) -> int:
    """Tasks per batched vector-Jacobian product: ``T x largest // P`` (at least 1), so that at most
    ``P + T x largest`` gradient entries exist at once."""
    return max(1, min(num_tasks, num_tasks * max(numels) // max(1, sum(numels))))


def fused_chunk(fused: dict, num_tasks: int, largest: int) -> int:
    """Tasks whose output gradients the fused Linear weights keep at once: within the memory bound
    ``P + T x largest`` (the sums being the P), at least 1."""
    per_task = sum(y.numel() for _, y in fused.values())
    return max(1, min(num_tasks, num_tasks * largest // max(1, per_task)))


def chunk_rows(losses: list[torch.Tensor], inputs: list[torch.Tensor], chunk: int):
    """Yield ``(first task, rows)`` for every chunk of ``chunk`` tasks: ``rows[i]`` holds the
    ``[c, *shape_i]`` gradients of the chunk's ``c`` losses w.r.t. ``inputs[i]`` (None where no loss
    reaches it), from one batched vector-Jacobian product (``is_grads_batched``). The graph is kept."""
    num_tasks = len(losses)
    stacked = torch.stack([loss.reshape(()) for loss in losses])
    eye = torch.eye(num_tasks, dtype=stacked.dtype, device=stacked.device)
    for start in range(0, num_tasks, chunk):
        rows = torch.autograd.grad(
            stacked,
            inputs,
            grad_outputs=eye[start : start + chunk],
            is_grads_batched=True,
            retain_graph=True,
            allow_unused=True,
        )
        yield start, list(rows)


def task_rows(losses: list[torch.Tensor], inputs: list[torch.Tensor], chunk: int):
    """Yield ``(t, grads of loss t w.r.t. inputs)`` for every task, None for unreached inputs:
    chunks of ``chunk`` tasks as one batched vector-Jacobian product (:func:`chunk_rows`), so at
    most ``chunk x len(inputs)`` gradient entries exist at once. The graph is kept."""
    num_tasks = len(losses)
    for start, rows in chunk_rows(losses, inputs, chunk):
        for r in range(min(chunk, num_tasks - start)):
            yield start + r, [g[r] if g is not None else None for g in rows]
