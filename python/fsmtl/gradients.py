"""Per-task gradients of the shared trunk and the masked multi-task backward (paper Eq. 4, 12)."""

from __future__ import annotations

import time
import warnings
import weakref
from collections.abc import Sequence

import torch

import fsmtl_kernels as fk


def per_task_gradients(
    losses: Sequence[torch.Tensor], params: Sequence[torch.Tensor], *, batched: bool = True
) -> list[torch.Tensor]:
    """Gradients of each task loss w.r.t. ``params``: one tensor ``[T, *shape_i]`` per parameter.

    With ``batched=True`` the T vector-Jacobian products run as one batched backward
    (autograd's ``is_grads_batched``); models whose ops have no batching rule fall back to T
    backward passes, with a one-time warning. The graph is kept (``retain_graph=True``).
    """
    losses = list(losses)
    params = list(params)
    num_tasks = len(losses)
    if batched:
        stacked = torch.stack([loss.reshape(()) for loss in losses])
        eye = torch.eye(num_tasks, dtype=stacked.dtype, device=stacked.device)
        try:
            grads = torch.autograd.grad(
                stacked, params, grad_outputs=eye, is_grads_batched=True, retain_graph=True, allow_unused=True
            )
            return [g if g is not None else p.new_zeros((num_tasks, *p.shape)) for g, p in zip(grads, params)]
        except RuntimeError as exc:
            warnings.warn(
                f"batched vector-Jacobian product failed ({exc.__class__.__name__}: {str(exc)[:120]}); "
                "using one backward pass per task",
                RuntimeWarning,
                stacklevel=2,
            )
    out = [p.new_zeros((num_tasks, *p.shape)) for p in params]
    for t, loss in enumerate(losses):
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        for o, g in zip(out, grads):
            if g is not None:
                o[t].copy_(g)
    return out


def _walk_graph(losses, stops: dict | None = None):
    """The autograd nodes reachable from the losses, each once, with the edges followed from it:
    ``(node, [(next node, its output index), ...])``; an edge into ``stops`` (node -> output
    indices) is not followed."""
    stops = stops or {}
    seen: set[torch.autograd.graph.Node] = set()
    stack = [loss.grad_fn for loss in losses if loss.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        edges = [(n, nr) for n, nr in node.next_functions if n is not None and nr not in stops.get(n, ())]
        stack.extend(n for n, _ in edges)
        yield node, edges


def _dense_split(
    losses: list[torch.Tensor], dense: list[torch.Tensor], boundary: Sequence[torch.Tensor]
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Split ``dense`` into (below, above, cut): ``below`` are the dense parameters the losses reach
    only through the ``boundary`` activations ``cut``; ``above`` the rest.

    A walk of the autograd graph from the losses that stops at the boundary tensors' edges (by
    node and output index, so a multi-output node's other outputs are still followed): a dense
    parameter met on the walk has a path to some loss that bypasses the boundary and stays
    ``above``. Parameters ``below`` get their gradient from the boundary's gradient alone, which
    is then exact (every path from them to a loss crosses the boundary).
    """
    cut = [b for b in boundary if isinstance(b, torch.Tensor) and b.grad_fn is not None]
    if not dense or not cut:
        return [], dense, []
    stops: dict[torch.autograd.graph.Node, set[int]] = {}
    for b in cut:
        stops.setdefault(b.grad_fn, set()).add(b.output_nr)
    reached = {
        id(node.variable) for node, _ in _walk_graph(losses, stops) if getattr(node, "variable", None) is not None
    }
    below = [p for p in dense if id(p) not in reached]
    if not below:
        return [], dense, []
    return below, [p for p in dense if id(p) in reached], cut


def _selected_count(mask: fk.PackedMask, dtype: torch.dtype, backend: str) -> list[torch.Tensor]:
    """Per entry, the number of tasks whose mask holds it (``dtype`` tensors shaped like the
    parameters), streamed task by task with :func:`fsmtl_kernels.masked_accumulate` and cached per
    mask object: no ``[T, P]`` tensor."""
    key = (id(mask), dtype)
    hit = _COUNTS.get(key)
    if hit is not None and hit[0]() is mask:
        return hit[1]
    counts = [torch.zeros(s, dtype=dtype, device=mask.device) for s in mask.shapes]
    ones = [torch.ones(s, dtype=dtype, device=mask.device) for s in mask.shapes]
    for t in range(mask.num_tasks):
        fk.masked_accumulate(counts, ones, mask, t, backend=backend)
    if len(_COUNTS) >= 4:
        _COUNTS.pop(next(iter(_COUNTS)))
    _COUNTS[key] = (weakref.ref(mask), counts)
    return counts


_COUNTS: dict[tuple, tuple] = {}

#: The mode ``batched="measure"`` measured, per (input parameters, T, device).
_CHOICE: dict[tuple, bool] = {}


def _task_rows(losses: list[torch.Tensor], inputs: list[torch.Tensor], batched: bool, chunk: int):
    """Yield ``(t, grads of loss t w.r.t. inputs)`` for every task, None for unreached inputs.

    Sequential: one ``autograd.grad`` per task (the floor: T backward passes). Batched: chunks of
    ``chunk`` tasks as one batched vector-Jacobian product (``is_grads_batched``), so at most
    ``chunk x len(inputs)`` gradient entries exist at once. The graph is kept.
    """
    num_tasks = len(losses)
    if not batched:
        for t, loss in enumerate(losses):
            yield t, torch.autograd.grad(loss, inputs, retain_graph=True, allow_unused=True)
        return
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
        for r in range(min(chunk, num_tasks - start)):
            yield start + r, [g[r] if g is not None else None for g in rows]


class _Sums:
    """Running sums of one step: masked parameters through :func:`fsmtl_kernels.masked_accumulate`,
    everything else (dense above the boundary, heads, the boundary's gradient) by ``add_``."""

    def __init__(self, masked, others, mask, backend):
        self.mask = mask
        self.masked = [_accumulator(p) for p in masked]
        self.others = [torch.zeros_like(p) for p in others]
        self.others_seen = [False] * len(others)
        # The op's kernel without the public checks (shapes and devices were checked once, by
        # _check_mask; rows come from autograd): on CUDA the per-call Python cost is the step's.
        device = (masked or others)[0].device
        self.run = fk.backends.kernel("masked_accumulate", backend, device) if mask is not None else None

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


def _check_mask(mask: fk.PackedMask | None, masked: list[torch.Tensor], num_tasks: int, tasks_from: str) -> None:
    """The mask fits the step: one row per task (``tasks_from`` names where T came from), one
    entry per masked parameter's shape, same device."""
    if mask is None:
        return
    if not isinstance(mask, fk.PackedMask):
        raise TypeError(f"mask must be a PackedMask or None, got {type(mask).__name__}")
    if mask.num_tasks != num_tasks:
        raise ValueError(f"mask has {mask.num_tasks} tasks but {tasks_from}")
    shapes = tuple(tuple(p.shape) for p in masked)
    if tuple(tuple(s) for s in mask.shapes) != shapes:
        raise ValueError(f"mask covers shapes {list(mask.shapes)} but masked_params have shapes {list(shapes)}")
    if masked and mask.device != masked[0].device:
        raise ValueError(f"mask is on {mask.device} but masked_params are on {masked[0].device}")


def _fusable_linears(record, losses, masked) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """The masked ``nn.Linear`` weights of ``record`` (:meth:`MultiTaskModel.linear_record`)
    whose task gradient is exactly ``G_t^T X`` from the call's input ``X`` and the gradient ``G_t``
    of its output: index in ``masked`` -> ``(X, output)``. A weight qualifies when its layer was
    called once, on 2-D inputs, its output was not modified in place afterwards, and a walk of the
    autograd graph from the losses finds the weight used only by that call (through its
    transpose): weight tying, a second use, a cast under autocast or a parametrization keep the
    weight on the plain path."""
    calls: dict[int, list] = {}
    for index, x, y, version in record:
        calls.setdefault(index, []).append((x, y, version))
    candidates = {}
    for index, items in calls.items():
        x, y, version = items[0]
        if len(items) != 1 or y._version != version or x.dim() != 2 or y.dim() != 2 or y.grad_fn is None:
            continue
        if type(y.grad_fn).__name__ in ("AddmmBackward0", "MmBackward0") and x.dtype == y.dtype:
            candidates[index] = (x, y)
    if not candidates:
        return {}
    users: dict[torch.autograd.graph.Node, list] = {}
    variables = {}
    for node, edges in _walk_graph(losses):
        variable = getattr(node, "variable", None)
        if variable is not None:
            variables[id(variable)] = node
        for nxt, _ in edges:
            users.setdefault(nxt, []).append(node)
    out = {}
    for index, (x, y) in candidates.items():
        leaf = variables.get(id(masked[index]))
        through = users.get(leaf, []) if leaf is not None else []
        if len(through) == 1 and type(through[0]).__name__ == "TBackward0" and users.get(through[0]) == [y.grad_fn]:
            out[index] = (x, y)
    return out


def _fuses(mask, masked, linear_record, backend: str) -> bool:
    """Whether the fused linear weight gradient may run: masked CPU parameters whose op backend
    is compiled (the C++ kernel; an explicit backend is taken as asked). On CUDA its Triton kernel
    has not run on a GPU yet, so CUDA keeps the per-task masked sum (measured on an H100)."""
    if mask is None or not linear_record or not masked or masked[0].device.type != "cpu":
        return False
    if fk.backends.requested_backend(backend) != "auto":
        return True
    return fk.backends.unavailable_reason("cpp", masked[0].device) is None


def _fused_chunk(fused, num_tasks: int, largest: int) -> int:
    """Tasks whose output gradients the fused weights keep at once: within the memory bound
    ``P + T x largest`` (the sums being the P), at least 1."""
    per_task = sum(y.numel() for _, y in fused.values())
    return max(1, min(num_tasks, num_tasks * largest // max(1, per_task)))


class _Stream:
    """T backward passes, one per :meth:`add`, streamed into the running sums.

    On CPU each masked parameter's gradient is added into its running sum the moment autograd
    produces it (a post-accumulate-grad hook per parameter, then ``.grad`` dropped): the one-layer
    gradient is consumed while in cache and at most one layer's task gradient exists at a time.
    ``others`` (dense parameters above the boundary, heads, boundary activations) accumulate in
    their own ``.grad`` over the T passes, moved into the sums by :meth:`close`. On CUDA a launch
    per parameter and task costs more than the cache saves: there each task's gradients come from
    one ``autograd.grad`` and are added by one launch over all parameters.

    ``fused`` (CPU; :func:`_fusable_linears`) maps Linear weights to their call's ``(X, output)``:
    the passes stop at those outputs (no weight gradient is formed), each task's output gradient
    ``G_t`` is kept for ``chunk`` tasks, and then :func:`fsmtl_kernels.masked_matmul_accumulate`
    adds ``sum_t S_t * (G_t^T X)`` into the weight's sum with the sum kept in cache. When the fused
    weights hold most of the masked entries, the rest (biases, small layers) are cheaper added by
    one call per task than by per-layer hooks (measured: MLP 1.44M, 0.91x against 0.98x the floor
    at T = 8); otherwise the hooks keep the large unfused gradients (convolutions) in cache.
    """

    def __init__(self, masked, others, mask, backend, fused=None, chunk: int = 1):
        self.masked, self.others, self.mask, self.backend = masked, others, mask, backend
        device = masked[0].device if masked else others[0].device
        self.fused, self.chunk = (fused or {}) if device.type == "cpu" else {}, chunk
        fused_entries = sum(masked[i].numel() for i in self.fused)
        self.hooked = device.type == "cpu" and 2 * fused_entries < sum(p.numel() for p in masked)
        self.sums = _Sums(masked, [] if self.hooked else others, mask, backend)
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

    def close(self) -> _Sums:
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


def _accumulator(p: torch.Tensor) -> torch.Tensor:
    """A zeroed running sum for ``p``: its ``.grad`` when that can hold the sum (float32/float64,
    contiguous, p's shape), else a new float32 (float64 for float64 parameters) tensor."""
    g = p.grad
    dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
    if g is not None and g.dtype == dtype and g.shape == p.shape and g.is_contiguous() and g.device == p.device:
        return g.zero_()
    return torch.zeros(p.shape, dtype=dtype, device=p.device)


def masked_multitask_backward(
    losses: Sequence[torch.Tensor],
    masked_params: Sequence[torch.Tensor],
    mask: fk.PackedMask | None,
    *,
    dense_params: Sequence[torch.Tensor] = (),
    head_params: Sequence[torch.Tensor] | None = None,
    normalize: str = "tasks",
    batched: bool | str = "auto",
    boundary: Sequence[torch.Tensor] = (),
    linear_record: Sequence[tuple] = (),
    backend: str = "auto",
) -> None:
    """Write ``.grad`` for a masked multi-task update (paper Eq. 4), streaming task by task.

    ``masked_params`` get ``sum_t S_t * g_t / T`` (or the ``"selected"`` normalization, divided
    by the number of tasks holding each entry, 0 where none does); ``dense_params`` (shared but
    unmasked) get the plain task average; ``head_params`` get the gradient of ``sum_t L_t`` (each
    head only sees its own task). ``mask=None`` means every task holds every entry (dense MTL).
    Existing ``.grad`` of the masked and dense parameters is overwritten, heads accumulate.
    ``head_params`` is required: forgetting it would silently leave the heads untrained; pass
    ``head_params=()`` when the heads get their gradient elsewhere.

    Each task's gradient is added into running sums as it arrives
    (:func:`fsmtl_kernels.masked_accumulate`), so no ``[T, P]`` tensor exists: the sequential
    mode holds O(P) extra floats; the batched mode O(P + chunk x P) with ``chunk`` tasks per
    batched vector-Jacobian product, ``chunk = T x (largest input) // P`` (at least 1), within
    ``P + T x largest`` floats.

    Args:
        batched: ``False``: T backward passes (the floor every gradient-manipulation method
            shares); ``True``: batched vector-Jacobian products (``is_grads_batched``; a model
            without batching rules falls back to T passes with a warning); ``"auto"``: the rule
            of :func:`auto_batched` (deterministic, so runs and resumed runs agree bit for bit);
            ``"measure"``: both timed once, at the first call for the same parameters, T and
            device, the faster kept for later calls (:func:`batched_choice`; the two modes may
            differ in the last bits, so the choice can change results between runs).
        boundary: activations separating the trunk's lower, unmasked layers from the masked ones
            (``MultiTaskModel.pop_forward_record()``). Dense parameters that reach the losses only
            through them get their task average from one backward of the boundary's summed
            gradient: per-task work runs through the masked layers and what lies above them.
            Dense parameters with any other path to a loss are handled per task, so any boundary
            gives the exact gradients.
        linear_record: the masked ``nn.Linear`` calls of the forward
            (``MultiTaskModel.linear_record()``). With T backward passes, a weight used only by
            its one 2-D call gets its masked sum from the call's input and the per-task gradients
            of its output (:func:`fsmtl_kernels.masked_matmul_accumulate`, the running sum kept
            in cache over the tasks) instead of T weight gradients each added into the sum;
            other weights take the plain path (checked on the autograd graph).
        backend: the :func:`fsmtl_kernels.masked_accumulate` backend.
    """
    if head_params is None:
        raise TypeError(
            "masked_multitask_backward needs head_params (e.g. model.head_parameters()); "
            "pass head_params=() if the heads get their gradient elsewhere"
        )
    losses = list(losses)
    if not losses:
        raise ValueError("losses must not be empty")
    for t, loss in enumerate(losses):
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            got = getattr(loss, "shape", type(loss).__name__)
            raise ValueError(f"losses[{t}] must be a scalar tensor (one loss per task), got {got}")
    if normalize not in fk.NORMALIZE_MODES:
        raise ValueError(f"normalize must be one of {fk.NORMALIZE_MODES}, got {normalize!r}")
    if batched not in (True, False, "auto", "measure"):
        raise ValueError(f"batched must be True, False, 'auto' or 'measure', got {batched!r}")
    masked = list(masked_params)
    _check_mask(mask, masked, len(losses), f"there are {len(losses)} losses")
    heads = list(head_params)
    below, above, cut = _dense_split(losses, list(dense_params), boundary)
    others = above + heads + cut
    inputs = masked + others
    num_tasks = len(losses)
    numels = [x.numel() for x in inputs]
    chunk = max(1, min(num_tasks, num_tasks * max(numels) // max(1, sum(numels))))
    key = (tuple(id(x) for x in masked + above + heads), tuple(x.shape for x in cut), num_tasks, inputs[0].device)
    if batched == "auto":
        mode = auto_batched(inputs)
    elif batched == "measure":
        mode = _CHOICE.get(key, "measure")
    else:
        mode = batched

    fused = _fusable_linears(linear_record, losses, masked) if _fuses(mask, masked, linear_record, backend) else {}

    def run(use_batched: bool) -> _Sums:
        if not use_batched:
            stream = _Stream(masked, others, mask, backend, fused, _fused_chunk(fused, num_tasks, max(numels)))
            try:
                for t, loss in enumerate(losses):
                    stream.add(t, loss, retain_graph=True)
            finally:
                sums = stream.close()
            return sums
        sums = _Sums(masked, others, mask, backend)
        for t, grads in _task_rows(losses, inputs, use_batched, chunk):
            sums.add(t, grads)
        return sums

    if mode == "measure":
        # Timed once: batched first (it also pays first-call costs, which favours the
        # sequential mode, the one with the smaller memory), then sequential, whose sums are used.
        sync = torch.cuda.synchronize if inputs[0].device.type == "cuda" else (lambda: None)
        try:
            sync()
            start = time.perf_counter()
            run(True)
            sync()
            batched_s = time.perf_counter() - start
        except RuntimeError:
            batched_s = float("inf")
        start = time.perf_counter()
        sums = run(False)
        sync()
        _CHOICE[key] = batched_s < time.perf_counter() - start
    elif mode:
        try:
            sums = run(True)
        except RuntimeError as exc:
            warnings.warn(
                f"batched vector-Jacobian product failed ({exc.__class__.__name__}: {str(exc)[:120]}); "
                "using one backward pass per task",
                RuntimeWarning,
                stacklevel=2,
            )
            sums = run(False)
    else:
        sums = run(False)

    _write_grads(sums, masked, above, heads, below, cut, mask, normalize, num_tasks, backend)


def _write_grads(sums, masked, above, heads, below, cut, mask, normalize, num_tasks, backend) -> None:
    """``.grad`` from the step's sums: masked parameters the normalized masked sum, dense ones
    (``above``) the task average, heads their sum (added to an existing ``.grad``), and the
    parameters ``below`` the boundary one backward of the averaged boundary gradient."""
    if mask is not None and normalize == "selected":
        counts = _selected_count(mask, torch.float32, backend)
        for acc, count in zip(sums.masked, counts):
            acc.div_(count.clamp_min(1).to(acc.dtype)).masked_fill_(count == 0, 0.0)
    else:
        for acc in sums.masked:
            acc.div_(num_tasks)
    for p, acc in zip(masked, sums.masked):
        p.grad = acc if acc.dtype == p.dtype else acc.to(p.dtype)
    n_above = len(above)
    for p, acc in zip(above, sums.others[:n_above]):
        p.grad = acc.div_(num_tasks)
    for p, acc, seen in zip(heads, sums.others[n_above : n_above + len(heads)], sums.others_seen[n_above:]):
        if seen:
            p.grad = acc if p.grad is None else p.grad.add_(acc)
    cut_sums = sums.others[n_above + len(heads) :]
    for p in below:
        p.grad = None
    if cut and any(sums.others_seen[n_above + len(heads) :]):
        torch.autograd.backward(cut, grad_tensors=[c.div_(num_tasks) for c in cut_sums], inputs=below)
    for p in below:
        if p.grad is None:
            p.grad = torch.zeros_like(p)


class MaskedBackwardStream:
    """Eq. 4 for losses that arrive one task at a time: each :meth:`backward` is one backward pass
    (its graph freed), streamed into the masked sum; :meth:`finish` writes ``.grad`` exactly as
    :func:`masked_multitask_backward` does for the same losses (the same bits: the same passes in
    the same order). For separate task forwards (``mask_forward``, heterogeneous tasks) run task
    ``t``'s forward, then ``backward(t, loss)``, before task ``t + 1``'s forward: one task graph
    alive at a time, O(P) extra memory.

    Use as a context manager (or call :meth:`close`): the CPU path hooks the masked parameters
    until then. Every task's loss must be passed exactly once before :meth:`finish`.
    """

    def __init__(
        self,
        masked_params: Sequence[torch.Tensor],
        mask: fk.PackedMask | None,
        *,
        num_tasks: int,
        dense_params: Sequence[torch.Tensor] = (),
        head_params: Sequence[torch.Tensor],
        normalize: str = "tasks",
        backend: str = "auto",
    ) -> None:
        if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
            raise ValueError(f"num_tasks must be a positive int, got {num_tasks!r}")
        if normalize not in fk.NORMALIZE_MODES:
            raise ValueError(f"normalize must be one of {fk.NORMALIZE_MODES}, got {normalize!r}")
        self.masked, self.dense, self.heads = list(masked_params), list(dense_params), list(head_params)
        _check_mask(mask, self.masked, num_tasks, f"num_tasks={num_tasks}")
        if not self.masked + self.dense + self.heads:
            raise ValueError("MaskedBackwardStream needs at least one parameter")
        self.mask, self.normalize, self.backend, self.num_tasks = mask, normalize, backend, num_tasks
        self.done = [False] * num_tasks
        self.stream = _Stream(self.masked, self.dense + self.heads, mask, backend)

    def backward(self, task: int, loss: torch.Tensor) -> None:
        """One backward pass of task ``task``'s scalar ``loss`` (its graph is freed)."""
        if isinstance(task, bool) or not isinstance(task, int) or not 0 <= task < self.num_tasks:
            raise ValueError(f"task must be an int in [0, {self.num_tasks}), got {task!r}")
        if self.done[task]:
            raise ValueError(f"task {task}'s loss was already passed in this step")
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            got = getattr(loss, "shape", type(loss).__name__)
            raise ValueError(f"loss of task {task} must be a scalar tensor, got {got}")
        self.stream.add(task, loss, retain_graph=False)
        self.done[task] = True

    def finish(self) -> None:
        """Write ``.grad`` (masked, dense and head parameters) and remove the hooks."""
        missing = [t for t, d in enumerate(self.done) if not d]
        if missing:
            self.close()
            raise ValueError(f"no loss was passed for task(s) {missing}; every task needs one backward")
        sums = self.stream.close()
        _write_grads(
            sums, self.masked, self.dense, self.heads, [], [], self.mask, self.normalize, self.num_tasks, self.backend
        )

    def close(self) -> None:
        """Remove the hooks without writing ``.grad`` (an abandoned step)."""
        self.stream.close()

    def __enter__(self) -> MaskedBackwardStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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


def batched_choice() -> dict[tuple, bool]:
    """What ``batched="measure"`` measured so far: (parameter ids, boundary shapes, T, device) ->
    True where the batched vector-Jacobian product was faster than T backward passes."""
    return dict(_CHOICE)


def dense_multitask_backward(losses: Sequence[torch.Tensor], shared_params: Sequence[torch.Tensor]) -> None:
    """Dense MTL in one backward pass: ``shared_params`` get the task average ``1/T sum_t g_t``,
    every other parameter the gradient of ``sum_t L_t`` (accumulated into ``.grad``)."""
    torch.stack([loss.reshape(()) for loss in losses]).sum().backward()
    with torch.no_grad():
        for p in shared_params:
            if p.grad is not None:
                p.grad.div_(len(losses))
