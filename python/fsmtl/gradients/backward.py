"""The public gradient API: per-task gradients of the shared trunk, the dense multi-task backward
and the masked multi-task backward (paper Eq. 4, 12), whole or streamed task by task."""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch

import fsmtl_kernels as fk

from .accumulate import Stream, Sums, write_grads
from .batching import MeasuredBatching, auto_batched, chunk_rows, fused_chunk, task_chunk, task_rows
from .graph import Partition, fusable_linears, partition
from .record import ForwardRecord


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
            _warn_batched_failed(exc)
    out = [p.new_zeros((num_tasks, *p.shape)) for p in params]
    for t, loss in enumerate(losses):
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        for o, g in zip(out, grads):
            if g is not None:
                o[t].copy_(g)
    return out


def _warn_batched_failed(exc: RuntimeError) -> None:
    warnings.warn(
        f"batched vector-Jacobian product failed ({exc.__class__.__name__}: {str(exc)[:120]}); "
        "using one backward pass per task",
        RuntimeWarning,
        stacklevel=3,
    )


def dense_multitask_backward(losses: Sequence[torch.Tensor], shared_params: Sequence[torch.Tensor]) -> None:
    """Dense MTL in one backward pass: ``shared_params`` get the task average ``1/T sum_t g_t``,
    every other parameter the gradient of ``sum_t L_t`` (accumulated into ``.grad``)."""
    torch.stack([loss.reshape(()) for loss in losses]).sum().backward()
    with torch.no_grad():
        for p in shared_params:
            if p.grad is not None:
                p.grad.div_(len(losses))


@dataclass(frozen=True)
class BackwardPath:
    """Which path a masked backward took (returned by :func:`masked_multitask_backward` and
    :meth:`MaskedBackwardStream.finish`): for tests, benchmarks and logs; the gradients are the
    same on every path up to rounding.

    Attributes:
        batched: the task gradients came from batched vector-Jacobian products (else from T
            backward passes).
        task_chunk: tasks per batched product, or per flush of the fused Linear weights.
        fused: indices (into ``masked_params``) of the Linear weights whose masked sum came from
            ``G_t^T X`` (:func:`fsmtl_kernels.masked_matmul_accumulate`).
        hooked: the masked gradients were added by per-parameter hooks as autograd produced them
            (CPU, T backward passes), not by one call per task.
        below: indices (into ``dense_params``) of the dense parameters whose average came from one
            backward of the boundary's gradient.
    """

    batched: bool
    task_chunk: int
    fused: tuple[int, ...] = ()
    hooked: bool = False
    below: tuple[int, ...] = ()


def check_mask(mask: fk.PackedMask | None, masked: list[torch.Tensor], num_tasks: int, tasks_from: str) -> None:
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


def _check_losses(losses: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    if isinstance(losses, torch.Tensor):
        what = "a scalar" if losses.dim() == 0 else f"one tensor of shape {tuple(losses.shape)}"
        raise TypeError(
            f"losses must be a list of T scalar losses, one per task, got {what}; pass [loss_1, ..., loss_T] "
            "(not their sum: the masked average needs each task's gradient)"
        )
    losses = list(losses)
    if not losses:
        raise ValueError("losses must not be empty")
    for t, loss in enumerate(losses):
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            got = getattr(loss, "shape", type(loss).__name__)
            raise ValueError(f"losses[{t}] must be a scalar tensor (one loss per task), got {got}")
    return losses


def _fuses(mask, masked, linears, backend: str) -> bool:
    """Whether the fused linear weight gradient may run: masked CPU or CUDA parameters whose op
    backend is there (the C++ kernel on CPU, the Triton kernel on CUDA; an explicit backend is
    taken as asked)."""
    device = masked[0].device if masked else None
    if mask is None or not linears or device is None or device.type not in ("cpu", "cuda"):
        return False
    if fk.backends.requested_backend(backend) != "auto":
        return True
    return fk.backends.unavailable_reason("cpp" if device.type == "cpu" else "triton", device) is None


def _chunked_launches(device: torch.device) -> bool:
    """Whether the batched mode adds each chunk of tasks with one launch per kernel (CUDA, where a
    launch per task and parameter costs more than the arithmetic) rather than task by task."""
    return device.type == "cuda"


def _add_chunks(sums: Sums, losses, masked, others, mask, fused: dict, chunk: int, backend: str) -> Sums:
    """The batched mode, chunk by chunk: one batched backward per chunk of tasks, stopped at the
    outputs of the ``fused`` Linear layers (whose masked weight sums come from one
    ``masked_matmul_accumulate`` launch per layer and chunk); the other masked gradients added by
    one ``masked_accumulate_tasks`` launch per chunk."""
    rest = [i for i in range(len(masked)) if i not in fused]
    outputs = [y for _, y in fused.values()]
    n = len(rest) + len(others)
    for first, rows in chunk_rows(losses, [masked[i] for i in rest] + others + outputs, chunk):
        sums.add_chunk(first, rows[:n], rest)
        for (i, (x, _)), g in zip(fused.items(), rows[n:]):
            if g is not None:  # [c, batch, out]: the chunk's output gradients
                fk.masked_matmul_accumulate(sums.masked[i], g.transpose(1, 2), x, mask, i, first, backend=backend)
    return sums


def masked_multitask_backward(
    losses: Sequence[torch.Tensor],
    masked_params: Sequence[torch.Tensor],
    mask: fk.PackedMask | None,
    *,
    dense_params: Sequence[torch.Tensor] = (),
    head_params: Sequence[torch.Tensor] | None = None,
    normalize: str = "tasks",
    batched: bool | str | MeasuredBatching = "auto",
    record: ForwardRecord | None = None,
    task_chunk_size: int | None = None,
    backend: str = "auto",
) -> BackwardPath:
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
        losses: the T task losses, scalar tensors, in mask-row order (not their sum).
        batched: ``False``: T backward passes (the floor every gradient-manipulation method
            shares); ``True``: batched vector-Jacobian products (``is_grads_batched``; a model
            without batching rules falls back to T passes with a warning; on CUDA each chunk of
            tasks is added by one launch per kernel); ``"auto"``: the rule
            of :func:`auto_batched` (deterministic, so runs and resumed runs agree bit for bit);
            a :class:`MeasuredBatching`: both timed once per input shapes, T and device, the
            faster kept in it for later calls (``"measure"``: a new one, timing this call).
        record: the :class:`ForwardRecord` the step's forwards filled. Its ``boundary`` (the
            activations separating the trunk's lower, unmasked layers from the masked ones): dense
            parameters that reach the losses only through it get their task average from one
            backward of the boundary's summed gradient, so per-task work runs through the masked
            layers and what lies above them; dense parameters with any other path to a loss are
            handled per task, so any boundary gives the exact gradients. Its ``linears`` (the masked
            ``nn.Linear`` calls): with T backward passes (and on CUDA in the batched mode too, a
            chunk of tasks at a time), a weight used only by its one 2-D call gets its masked sum
            from the call's input and the per-task gradients of its output
            (:func:`fsmtl_kernels.masked_matmul_accumulate`, the running sum kept in cache over the
            tasks) instead of T weight gradients each added into the sum; other weights take the
            plain path (checked on the autograd graph).
        task_chunk_size: tasks whose Linear output gradients the fused path keeps at once
            (default: as many as the bound ``P + T x largest`` allows).
        backend: the :func:`fsmtl_kernels.masked_accumulate` backend.

    Returns:
        The :class:`BackwardPath` taken.
    """
    if head_params is None:
        raise TypeError(
            "masked_multitask_backward needs head_params (e.g. model.head_parameters()); "
            "pass head_params=() if the heads get their gradient elsewhere"
        )
    losses = _check_losses(losses)
    if normalize not in fk.NORMALIZE_MODES:
        raise ValueError(f"normalize must be one of {fk.NORMALIZE_MODES}, got {normalize!r}")
    if not isinstance(batched, MeasuredBatching) and batched not in (True, False, "auto", "measure"):
        raise ValueError(f"batched must be True, False, 'auto', 'measure' or a MeasuredBatching, got {batched!r}")
    if record is not None and not isinstance(record, ForwardRecord):
        raise TypeError(f"record must be a fsmtl.ForwardRecord or None, got {type(record).__name__}")
    if task_chunk_size is not None and (isinstance(task_chunk_size, bool) or not isinstance(task_chunk_size, int)
                                        or task_chunk_size < 1):  # fmt: skip
        raise ValueError(f"task_chunk_size must be a positive int or None, got {task_chunk_size!r}")
    masked = list(masked_params)
    check_mask(mask, masked, len(losses), f"there are {len(losses)} losses")
    boundary = record.boundary if record is not None else ()
    linears = record.linears if record is not None else ()
    parts = partition(losses, masked, list(dense_params), list(head_params), boundary)
    others = parts.others
    inputs = masked + others
    num_tasks = len(losses)
    numels = [x.numel() for x in inputs]
    chunk = task_chunk(numels, num_tasks)
    measured = MeasuredBatching() if batched == "measure" else batched
    if batched == "auto":
        mode = auto_batched(inputs)
    elif isinstance(measured, MeasuredBatching):
        mode = measured.choices.get(MeasuredBatching.key(inputs, num_tasks), "measure")
    else:
        mode = batched

    fused = fusable_linears(linears, losses, masked) if _fuses(mask, masked, linears, backend) else {}
    fused_tasks = task_chunk_size or fused_chunk(fused, num_tasks, max(numels))
    taken: list[BackwardPath] = []

    def run(use_batched: bool) -> Sums:
        if not use_batched:
            stream = Stream(masked, others, mask, backend, fused, fused_tasks)
            try:
                for t, loss in enumerate(losses):
                    stream.add(t, loss, retain_graph=True)
            finally:
                sums = stream.close()
            taken.append(BackwardPath(False, fused_tasks if stream.fused else 1, tuple(stream.fused), stream.hooked))
            return sums
        sums = Sums(masked, others, mask, backend)
        if _chunked_launches(inputs[0].device):
            taken.append(BackwardPath(True, chunk, tuple(fused)))
            return _add_chunks(sums, losses, masked, others, mask, fused, chunk, backend)
        for t, grads in task_rows(losses, inputs, chunk):
            sums.add(t, grads)
        taken.append(BackwardPath(True, chunk))
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
        measured.choices[MeasuredBatching.key(inputs, num_tasks)] = batched_s < time.perf_counter() - start
    elif mode:
        try:
            sums = run(True)
        except RuntimeError as exc:
            _warn_batched_failed(exc)
            sums = run(False)
    else:
        sums = run(False)

    write_grads(sums, parts, mask, normalize, num_tasks)
    below = {id(p) for p in parts.below}
    path = taken[-1]
    return BackwardPath(path.batched, path.task_chunk, path.fused, path.hooked,
                        tuple(i for i, p in enumerate(dense_params) if id(p) in below))  # fmt: skip


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
        self.parts = Partition(list(masked_params), list(dense_params), list(head_params))
        check_mask(mask, self.parts.masked, num_tasks, f"num_tasks={num_tasks}")
        if not self.parts.masked + self.parts.others:
            raise ValueError("MaskedBackwardStream needs at least one parameter")
        self.mask, self.normalize, self.num_tasks = mask, normalize, num_tasks
        self.done = [False] * num_tasks
        self.stream = Stream(self.parts.masked, self.parts.others, mask, backend)

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

    def finish(self) -> BackwardPath:
        """Write ``.grad`` (masked, dense and head parameters) and remove the hooks."""
        missing = [t for t, d in enumerate(self.done) if not d]
        if missing:
            self.close()
            raise ValueError(f"no loss was passed for task(s) {missing}; every task needs one backward")
        sums = self.stream.close()
        write_grads(sums, self.parts, self.mask, self.normalize, self.num_tasks)
        return BackwardPath(False, 1, hooked=self.stream.hooked)

    def close(self) -> None:
        """Remove the hooks without writing ``.grad`` (an abandoned step)."""
        self.stream.close()

    def __enter__(self) -> MaskedBackwardStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
