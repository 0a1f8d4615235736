"""Data-parallel steps of the Trainer on ``torch.distributed`` (gloo on CPU, NCCL on CUDA),
without DDP's reducer.

What the :class:`~fsmtl.engine.Trainer` does when a process group with more than one rank is
initialized (``torchrun``, ``fsmtl run --nproc N`` or a user's own script):

* **Data**: every rank draws the same global batch order (the same seed) with the global batch
  ``batch_size * world_size`` and keeps its share ``batch[rank::world_size]`` (the interleaving of
  ``DistributedSampler``); a loader with a ``DistributedSampler`` already yields the rank's share.
* **Step**: each rank forms its per-task gradients and the masked average locally (no DDP wrapper,
  so no ``retain_graph`` inside DDP's reducer); then :class:`GradientSync` sums the combined shared
  and head gradients, weighted by each rank's share of the batch, with **one** ``all_reduce`` over
  one flat buffer: as many numbers as plain data-parallel training moves, not T times that. The T
  loss values, a stop flag and one flag per rank (its own losses were not finite) travel in a
  second all-reduce of ``T + 1 + W`` numbers before the backward, so every rank agrees on
  non-finite losses (and knows which rank saw them) and on stop requests: a non-finite value on
  one rank stops every rank at that step.
* **Mask update**: the N Fisher samples are split across ranks (:func:`shard_sampler`); the scores
  and masks are then combined by :mod:`fsmtl.collectives`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from .. import collectives
from ..collectives import world

#: The ranks whose own losses were not finite at the latest step that had any (for the message
#: that stops every rank); empty when none had.
nonfinite_ranks: list[int] = []


def shares(n: int, rank: int, size: int) -> torch.Tensor:
    """Indices ``rank, rank + size, ...`` of a batch of ``n`` (``DistributedSampler``'s interleaving)."""
    return torch.arange(rank, n, size)


def _uses_distributed_sampler(data) -> bool:
    from torch.utils.data import DistributedSampler

    items = data if isinstance(data, (list, tuple)) else [data]
    for d in items:
        sampler = getattr(getattr(d, "batch_sampler", None), "sampler", None) or getattr(d, "sampler", None)
        if isinstance(sampler, DistributedSampler):
            return True
    return False


class GradientSync:
    """The per-step collectives of one Trainer in a process group of ``size`` ranks.

    The Trainer draws global batches (:meth:`global_batch_size`), :meth:`shard_source` keeps this
    rank's share of each one and its weight ``n_rank / n_global``; :meth:`reduce_losses` and
    :meth:`all_reduce_grads` turn the local losses and gradients into the global batch's ones.
    """

    def __init__(self, group=None) -> None:
        w = world(group)
        if w is None:
            raise RuntimeError("GradientSync needs an initialized process group with more than one rank")
        self.group = group
        self.rank, self.size = w
        self.weight = 1.0 / self.size
        self.stop = False
        self.bytes_per_step = 0
        self.presharded = False

    def global_batch_size(self, batch_size: int | None, data) -> int | None:
        self.presharded = _uses_distributed_sampler(data)
        if batch_size is None or self.presharded:
            return batch_size
        return batch_size * self.size

    def shard_source(self, source):
        """Wrap a batch source so that its ``epoch()`` yields this rank's share of each batch."""
        if self.presharded:
            return source
        return _ShardedSource(source, self)

    def shard(self, inputs: list[torch.Tensor], targets: list[torch.Tensor]):
        """This rank's share of a global batch; records its weight. A rank whose share would be
        empty (a last batch smaller than the world) computes on one example with weight 0."""
        sizes = [int(x.shape[0]) for x in inputs]
        idx = [shares(n, self.rank, self.size) for n in sizes]
        counts = [len(i) for i in idx]
        self.weight = sum(c / n for c, n in zip(counts, sizes)) / len(sizes)
        idx = [i if len(i) else torch.zeros(1, dtype=torch.long) for i in idx]
        same = len(inputs) > 1 and all(x is inputs[0] for x in inputs)
        if same:
            x = inputs[0][idx[0]]
            new_inputs = [x] * len(inputs)
        else:
            new_inputs = [x[i] for x, i in zip(inputs, idx)]
        return new_inputs, [y[i] for y, i in zip(targets, idx)]

    def reduce_losses(self, values: torch.Tensor, stop: bool) -> torch.Tensor:
        """The global batch's mean loss per task (float64 ``[T]``); also agrees on ``stop`` and
        records in :data:`nonfinite_ranks` which ranks' own losses were not finite."""
        flags = torch.zeros(self.size + 1, dtype=torch.float64)
        flags[0] = 1.0 if stop else 0.0
        flags[1 + self.rank] = 0.0 if bool(torch.isfinite(values).all()) else 1.0
        t = values.numel()
        buf = torch.cat([values.double() * self.weight, flags])
        collectives.entered()
        dist.all_reduce(buf, group=self.group)
        self.stop = bool(buf[t] > 0)
        bad = [r for r in range(self.size) if buf[t + 1 + r] > 0]
        if bad:
            nonfinite_ranks[:] = bad
        return buf[:t].to(values.dtype)

    def all_reduce_grads(self, params: Sequence[torch.Tensor]) -> None:
        """``.grad = sum_r w_r * grad_r`` with one all-reduce of one flat buffer (a parameter
        without ``.grad`` contributes zeros and keeps ``None``)."""
        params = [p for p in params if p.requires_grad]
        if not params:
            return
        ref = params[0]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1).to(ref.dtype) for g in grads]).mul_(self.weight)
        collectives.entered()
        dist.all_reduce(flat, group=self.group)
        self.bytes_per_step = flat.numel() * flat.element_size()
        offset = 0
        with torch.no_grad():
            for p, g in zip(params, grads):
                n = g.numel()
                if p.grad is not None:
                    p.grad.copy_(flat[offset : offset + n].view_as(g))
                offset += n

    def info(self) -> dict:
        """``world_size``, ``backend`` and the gradient bytes each rank all-reduces per step."""
        return {"world_size": self.size, "backend": dist.get_backend(self.group), "bytes_per_step": self.bytes_per_step}

    def shard_sampler(self, sample: Callable):
        return shard_sampler(sample, self.rank, self.size)


class _ShardedSource:
    def __init__(self, source, sync: GradientSync) -> None:
        self.source = source
        self.sync = sync
        self.steps_per_epoch = source.steps_per_epoch

    def epoch(self):
        for inputs, targets in self.source.epoch():
            yield self.sync.shard(list(inputs), list(targets))


def shard_sampler(sample: Callable, rank: int, size: int) -> Callable:
    """``sample(t, n)`` drawing the same ``n`` examples on every rank (the same generator state)
    and keeping this rank's disjoint share of them."""

    def sharded(t: int, n: int):
        x, y = sample(t, n)
        if x.shape[0] < size:
            raise ValueError(f"{x.shape[0]} Fisher samples cannot be split over {size} ranks; use samples >= {size}")
        idx = shares(x.shape[0], rank, size).to(x.device)
        return x[idx], y[idx]

    return sharded
