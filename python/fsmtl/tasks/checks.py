"""Boundary checks of training data and head outputs, per task kind.

Every check raises ``TypeError``/``ValueError`` naming the task and the argument (``where``) before
anything is trained. Shape and dtype checks read only metadata; value checks (range, finiteness)
read the data, so the Trainer runs them on CPU tensors (before the transfer to the device) or once
per ``fit`` on an in-memory split, never as an extra device sync per step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .registry import task_kind


def check_targets(task, target: torch.Tensor, n: int, where: str, *, values: bool = True) -> None:
    """Dtype/shape of ``target`` for ``n`` samples of ``task`` (the kind's ``check_target``) and,
    with ``values``, its value range: binary in {0, 1}; multiclass in [0, C); segmentation in
    [0, C) or -1 (ignored); regression/depth finite."""
    kind = task_kind(task.kind)
    kind.check_target(task, target, n, f"{where} task {task.name!r}")
    if not values or target.numel() == 0:
        return
    if target.is_floating_point():
        if not bool(torch.isfinite(target).all()):
            raise ValueError(f"{where}: targets of task {task.name!r} contain NaN or infinity")
        if kind.name == "binary" and not bool(((target == 0) | (target == 1)).all()):
            found = torch.unique(target)[:5].tolist()
            raise ValueError(f"{where}: binary task {task.name!r} needs targets in {{0, 1}}, found values {found}")
        return
    if not kind.single_output:
        lo = -1 if kind.dense else 0  # dense kinds (segmentation) mark ignored pixels with -1
        bad = (target < lo) | (target >= task.num_outputs)
        if bool(bad.any()):
            raise ValueError(
                f"{where}: task {task.name!r} of kind {kind.name!r} needs class labels in [{lo}, {task.num_outputs}), "
                f"found {int(target[bad].flatten()[0])}"
            )


def check_inputs(task, inputs: torch.Tensor, where: str, *, values: bool = True) -> None:
    """``inputs`` is a floating (or uint8 image) tensor with at least one sample dimension and,
    with ``values``, finite."""
    if not isinstance(inputs, torch.Tensor):
        raise TypeError(f"{where}: inputs of task {task.name!r} must be torch.Tensor, got {type(inputs).__name__}")
    if inputs.dim() < 1:
        raise ValueError(f"{where}: inputs of task {task.name!r} need a sample dimension, got a scalar")
    if values and inputs.is_floating_point() and not bool(torch.isfinite(inputs).all()):
        raise ValueError(f"{where}: inputs of task {task.name!r} contain NaN or infinity")


def check_outputs(task, outputs: torch.Tensor, target: torch.Tensor, where: str) -> None:
    """The head's ``outputs`` fit ``task``: binary/regression ``[n]`` or ``[n, 1]``; multiclass
    ``[n, C]``; dense kinds ``[n, num_outputs, H, W]`` with the target's ``H, W``."""
    kind = task_kind(task.kind)
    n = target.shape[0]
    shape = tuple(outputs.shape)
    if kind.dense:
        ok = len(shape) == 4 and shape[:2] == (n, task.num_outputs) and shape[2:] == tuple(target.shape[-2:])
        expected = f"[{n}, {task.num_outputs}, {', '.join(str(s) for s in target.shape[-2:])}]"
    elif kind.single_output:
        ok = shape in ((n,), (n, 1))
        expected = f"[{n}, 1]"
    else:
        ok = shape == (n, task.num_outputs)
        expected = f"[{n}, {task.num_outputs}]"
    if not ok:
        raise ValueError(
            f"{where}: the head of task {task.name!r} (kind {kind.name!r}, num_outputs={task.num_outputs}) "
            f"returns {list(shape)}, expected {expected}"
        )


def _values_ok(tasks: Sequence, inputs: Sequence, targets: Sequence) -> bool:
    """All value checks of a batch at once (each shared input once, binary targets stacked): a
    few tensor ops per batch instead of a few per task; False sends the caller to the per-task
    checks, which name the culprit."""
    seen = set()
    for x in inputs:
        if id(x) not in seen and x.is_floating_point() and not bool(torch.isfinite(x).all()):
            return False
        seen.add(id(x))
    binary = [y for task, y in zip(tasks, targets) if task.kind == "binary"]
    if binary and not (len({y.shape for y in binary}) == 1 and bool(_in01(torch.stack(binary)).all())):
        return False
    for task, y in zip(tasks, targets):
        kind = task_kind(task.kind)
        if task.kind == "binary" or y.numel() == 0:
            continue
        if y.is_floating_point():
            if not bool(torch.isfinite(y).all()):
                return False
        elif not kind.single_output:
            lo, hi = torch.aminmax(y)
            if int(lo) < (-1 if kind.dense else 0) or int(hi) >= task.num_outputs:
                return False
    return True


def _in01(y: torch.Tensor) -> torch.Tensor:
    return (y == 0) | (y == 1)


def check_batch(tasks: Sequence, inputs: Sequence, targets: Sequence, where: str, *, values: bool = True) -> None:
    """One batch: T inputs and T targets with matching, non-zero sample counts, the dtype/shape
    of each task kind and, with ``values``, finite inputs and targets in range."""
    if len(inputs) != len(tasks) or len(targets) != len(tasks):
        raise ValueError(f"{where}: {len(inputs)} inputs and {len(targets)} targets for {len(tasks)} tasks")
    if values:
        # Metadata first (cheap, and the combined value check relies on it), then values at once.
        check_batch(tasks, inputs, targets, where, values=False)
        if _values_ok(tasks, inputs, targets):
            return
    for task, x, y in zip(tasks, inputs, targets):
        check_inputs(task, x, where, values=values)
        if x.shape[0] == 0:
            raise ValueError(f"{where}: task {task.name!r} has no samples (empty data)")
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"{where}: targets of task {task.name!r} must be torch.Tensor, got {type(y).__name__}")
        if y.shape[:1] != x.shape[:1]:
            raise ValueError(
                f"{where}: task {task.name!r} has {x.shape[0]} inputs but {tuple(y.shape[:1])} targets (lengths differ)"
            )
        check_targets(task, y, x.shape[0], where, values=values)
