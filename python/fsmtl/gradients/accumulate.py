"""The running sums of one masked backward and how task gradients reach them: :class:`Sums`
(one ``add`` per task), :class:`Stream` (T backward passes streamed into the sums, with
per-parameter hooks on CPU and the fused Linear weight gradient), and :func:`write_grads`, which
turns the sums into ``.grad``. No ``[T, P]`` tensor ever exists."""

from __future__ import annotations

from collections.abc import Sequence

import torch

import fsmtl_kernels as fk

from .graph import Partition


def accumulator(p: torch.Tensor) -> torch.Tensor:
    """A zeroed running sum for ``p``: its ``.grad`` when that can hold the sum (float32/float64,
    contiguous, p's shape), else a new float32 (float64 for float64 parameters) tensor."""
    g = p.grad
    dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
    if g is not None and g.dtype == dtype and g.shape == p.shape and g.is_contiguous() and g.device == p.device:
        return g.zero_()
    return torch.zeros(p.shape, dtype=dtype, device=p.device)


class Sums:
    """Running sums of one step: masked parameters through the ``masked_accumulate`` kernel,
    everything else (dense above the boundary, heads, the boundary's gradient) by ``add_``."""

    def __init__(self, masked, others, mask: fk.PackedMask | None, backend: str) -> None:
        self.mask, self.backend = mask, backend
        self.masked = [accumulator(p) for p in masked]
        self.others = [torch.zeros_like(p) for p in others]
        self.others_seen = [False] * len(others)
        # The op's kernel without the public checks (shapes and devices were checked once, by
        # check_mask; rows come from autograd): on CUDA the per-call Python cost is the step's.
        device = (masked or others)[0].device
        self.run = fk.unchecked_kernel("masked_accumulate", device, backend) if mask is not None else None

    def add(self, t: int, grads, indices: Sequence[int] | None = None) -> None:
        """Task ``t``'s gradients: of the masked parameters ``indices`` (default all), then ``others``."""
        indices = range(len(self.masked)) if indices is None else indices
        n = len(indices)
        accs = [self.masked[i] for i in indices]
        rows = [g if g is not None else torch.zeros_like(a) for g, a in zip(grads[:n], accs)]
        if self.run is not None:
            offsets = self.mask.word_offsets
            self.run(accs, rows, self.mask.words, [offsets[i] for i in indices], t)
        else:
            for a, g in zip(accs, rows):
                a.add_(g)
        for i, g in enumerate(grads[n:]):
            if g is not None:
                self.others[i].add_(g)
                self.others_seen[i] = True

    def add_chunk(self, first: int, rows, indices: Sequence[int] | None = None) -> None:
        """Tasks ``first`` to ``first + k - 1`` at once, ``rows`` as :meth:`add`'s ``grads`` with a
        leading task dimension ``[k, *shape]`` (one batched backward): the masked sums by one
        ``masked_accumulate_tasks`` launch (the bits of k :meth:`add` calls), ``others`` by one sum
        over the chunk each."""
        indices = range(len(self.masked)) if indices is None else indices
        n = len(indices)
        k = next((g.shape[0] for g in rows if g is not None), 0)
        accs = [self.masked[i] for i in indices]
        chunk = [g if g is not None else a.new_zeros((k, *a.shape)) for g, a in zip(rows[:n], accs)]
        if self.mask is not None and accs:
            run = fk.unchecked_kernel("masked_accumulate_tasks", accs[0].device, self.backend)
            offsets = self.mask.word_offsets
            run(accs, chunk, self.mask.words, [offsets[i] for i in indices], first)
        else:
            for a, g in zip(accs, chunk):
                a.add_(g.sum(0))
        for i, g in enumerate(rows[n:]):
            if g is not None:
                self.others[i].add_(g.sum(0))
                self.others_seen[i] = True


class Stream:
    """T backward passes, one per :meth:`add`, streamed into the running sums.

    On CPU each masked parameter's gradient is added into its running sum the moment autograd
    produces it (a post-accumulate-grad hook per parameter, then ``.grad`` dropped): the one-layer
    gradient is consumed while in cache and at most one layer's task gradient exists at a time.
    ``others`` (dense parameters above the boundary, heads, boundary activations) accumulate in
    their own ``.grad`` over the T passes, moved into the sums by :meth:`close`. On CUDA a launch
    per parameter and task costs more than the cache saves: there each task's gradients come from
    one ``autograd.grad`` and are added by one launch over all parameters.

    ``fused`` (:func:`fsmtl.gradients.graph.fusable_linears`) maps Linear weights to their
    call's ``(X, output)``: the passes stop at those outputs (no weight gradient is formed), each
    task's output gradient ``G_t`` is kept for ``chunk`` tasks, and then
    :func:`fsmtl_kernels.masked_matmul_accumulate` adds ``sum_t S_t * (G_t^T X)`` into the weight's
    sum with the sum kept in cache. When the fused weights hold most of the masked entries, the
    rest (biases, small layers) are cheaper added by one call per task than by per-layer hooks
    (measured: MLP 1.44M, 0.91x against 0.98x the floor at T = 8); otherwise the hooks keep the
    large unfused gradients (convolutions) in cache.
    """

    def __init__(self, masked, others, mask, backend, fused=None, chunk: int = 1):
        self.masked, self.others, self.mask, self.backend = masked, others, mask, backend
        device = masked[0].device if masked else others[0].device
        self.fused, self.chunk = fused or {}, chunk
        fused_entries = sum(masked[i].numel() for i in self.fused)
        self.hooked = device.type == "cpu" and 2 * fused_entries < sum(p.numel() for p in masked)
        self.sums = Sums(masked, [] if self.hooked else others, mask, backend)
        self.rest = [i for i in range(len(masked)) if i not in self.fused]
        self.outputs = [y for _, y in self.fused.values()]
        self.kept = {i: [] for i in self.fused}  # per fused weight, G_t^T of the chunk's tasks
        self.first = 0  # the first task of the chunk
        self.task = -1
        self.handles = []
        self.closed = False
        if not self.hooked:
            self.inputs = [masked[i] for i in self.rest] + others + self.outputs
            return
        run = self.sums.run
        offsets = mask.word_offsets if mask is not None else []
        sums = self.sums

        def hook_for(i: int):
            def hook(p: torch.Tensor) -> None:
                g, p.grad = p.grad, None
                if run is None:
                    sums.masked[i].add_(g)
                else:
                    run([sums.masked[i]], [g], mask.words, [offsets[i]], self.task)

            return hook

        def keep_for(i: int):
            def keep(g: torch.Tensor) -> None:
                self.kept[i].append(g.t())

            return keep

        for o in others + self.outputs:
            if not o.is_leaf:
                o.retain_grad()  # a boundary activation: its .grad collects the T passes' sum
        self.saved = [o.grad for o in others]
        for p in masked:
            p.grad = None  # the accumulator may be the old .grad (zeroed), kept in sums.masked
        for o in others:
            o.grad = None
        self.inputs = [masked[i] for i in self.rest] + others + self.outputs
        self.handles = [masked[i].register_post_accumulate_grad_hook(hook_for(i)) for i in self.rest]
        self.handles += [y.register_hook(keep_for(i)) for i, (_, y) in self.fused.items()]

    def add(self, t: int, loss: torch.Tensor, retain_graph: bool) -> None:
        """One backward pass of task ``t``'s loss into the sums."""
        self.task = t
        if self.hooked:
            torch.autograd.backward(loss, inputs=self.inputs, retain_graph=retain_graph)
            for _, y in self.fused.values():
                y.grad = None
        else:
            grads = torch.autograd.grad(loss, self.inputs, retain_graph=retain_graph, allow_unused=True)
            n = len(grads) - len(self.outputs)
            self.sums.add(t, grads[:n], self.rest)
            for i, g in zip(self.fused, grads[n:]):
                if g is not None:
                    self.kept[i].append(g.t())
        for i, (_, y) in self.fused.items():
            if len(self.kept[i]) < t + 1 - self.first:  # the loss does not reach this layer
                self.kept[i].append(torch.zeros_like(y).t())
        if t + 1 - self.first == self.chunk:
            self._flush()

    def _flush(self) -> None:
        """The kept tasks' masked weight gradients into the fused weights' sums."""
        for i, kept in self.kept.items():
            if kept:
                x = self.fused[i][0]
                fk.masked_matmul_accumulate(
                    self.sums.masked[i], torch.stack(kept), x, self.mask, i, self.first, backend=self.backend
                )
                kept.clear()
        self.first = self.task + 1

    def close(self) -> Sums:
        """Remove the hooks; the sums of every pass so far (``.grad`` of ``others`` restored)."""
        for h in self.handles:
            h.remove()
        self.handles = []
        if self.closed:
            return self.sums
        self.closed = True
        self._flush()
        if self.hooked:
            others = self.others
            self.sums.others = [o.grad if o.grad is not None else torch.zeros_like(o) for o in others]
            self.sums.others_seen = [o.grad is not None for o in others]
            for o, old in zip(others, self.saved):
                o.grad = old
        return self.sums


def write_grads(sums: Sums, parts: Partition, mask: fk.PackedMask | None, normalize: str, num_tasks: int) -> None:
    """``.grad`` from the step's sums: masked parameters the normalized masked sum, dense ones
    (``above``) the task average, heads their sum (added to an existing ``.grad``), and the
    parameters ``below`` the boundary one backward of the averaged boundary gradient."""
    if mask is not None and normalize == "selected":
        for acc, count in zip(sums.masked, mask.task_counts()):
            acc.div_(count.clamp_min(1).to(acc.dtype)).masked_fill_(count == 0, 0.0)
    else:
        for acc in sums.masked:
            acc.div_(num_tasks)
    for p, acc in zip(parts.masked, sums.masked):
        p.grad = acc if acc.dtype == p.dtype else acc.to(p.dtype)
    n_above, n_heads = len(parts.above), len(parts.heads)
    for p, acc in zip(parts.above, sums.others[:n_above]):
        p.grad = acc.div_(num_tasks)
    for p, acc, seen in zip(parts.heads, sums.others[n_above : n_above + n_heads], sums.others_seen[n_above:]):
        if seen:
            p.grad = acc if p.grad is None else p.grad.add_(acc)
    cut_sums = sums.others[n_above + n_heads :]
    for p in parts.below:
        p.grad = None
    if parts.cut and any(sums.others_seen[n_above + n_heads :]):
        torch.autograd.backward(parts.cut, grad_tensors=[c.div_(num_tasks) for c in cut_sums], inputs=parts.below)
    for p in parts.below:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
