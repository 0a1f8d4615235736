"""The forms a batch of multi-task data comes in, and drawing examples from any of them.

A homogeneous batch is ``(inputs, targets)`` with one target per task (a sequence in task order
or a mapping by task name), or ``(inputs, y_1, ..., y_T)`` as from a ``TensorDataset``; a
heterogeneous task's batch is ``(inputs, target)``. :func:`sampler` draws ``n`` examples of one
task from a :class:`~fsmtl.data.Split`, a dataset, a loader or any iterable of such batches (the
Fisher samples of a mask update). ``uint8`` inputs are images in [0, 255]: they stay uint8 until
the batch is on the device and become float32 in [0, 1] there (:func:`to_device`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, default_collate

from .datasets import backing_split
from .split import Split


def is_map_dataset(data) -> bool:
    """A map-style dataset with a length (indexable), not an iterable one."""
    return isinstance(data, Dataset) and not isinstance(data, IterableDataset) and hasattr(data, "__len__")


def targets_per_task(ys, tasks: Sequence, where: str) -> list:
    """One target per task from a sequence in task order or a mapping by task name."""
    if isinstance(ys, Mapping):
        missing = [t.name for t in tasks if t.name not in ys]
        if missing:
            raise ValueError(f"{where}: the targets mapping has no entry for task(s) {missing}; it has {list(ys)}")
        return [ys[t.name] for t in tasks]
    if isinstance(ys, torch.Tensor):
        if len(tasks) == 1:
            return [ys]
        raise TypeError(
            f"{where}: got one target tensor for {len(tasks)} tasks; give one target per task "
            "(a sequence in task order or a mapping by task name)"
        )
    if not isinstance(ys, Sequence) or isinstance(ys, str):
        raise TypeError(f"{where}: targets must be a sequence or a mapping by task name, got {type(ys).__name__}")
    if len(ys) != len(tasks):
        raise ValueError(f"{where}: {len(ys)} targets for {len(tasks)} tasks ({[t.name for t in tasks]})")
    return list(ys)


def homogeneous_batch(batch, tasks: Sequence, where: str) -> tuple[torch.Tensor, list]:
    """``(inputs, targets)`` or ``(inputs, y_1, ..., y_T)`` -> inputs and one target per task."""
    if isinstance(batch, torch.Tensor):
        raise TypeError(
            f"{where}: a batch is one tensor, not (inputs, targets): the data must yield batches of inputs and "
            f"targets. For tensors x and ys (one target per task), pass fsmtl.data.Split([x] * {len(tasks)}, ys) or "
            "TensorDataset(x, *ys), not the pair (x, ys)"
        )
    if isinstance(batch, Mapping) or not isinstance(batch, Sequence) or len(batch) < 2:
        raise TypeError(f"{where}: a homogeneous batch must be (inputs, targets), got {type(batch).__name__}")
    if len(batch) == 2:
        return batch[0], targets_per_task(batch[1], tasks, where)
    if len(batch) == len(tasks) + 1:
        return batch[0], list(batch[1:])
    raise ValueError(
        f"{where}: a batch of inputs and {len(batch) - 1} targets for {len(tasks)} tasks "
        f"({[t.name for t in tasks]}); give one target per task: (inputs, targets) or (inputs, y_1, ..., "
        f"y_{len(tasks)})"
    )


def task_batch(batch, task, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A heterogeneous task's ``(inputs, target)`` batch."""
    if isinstance(batch, Mapping) or not isinstance(batch, Sequence) or len(batch) != 2:
        raise TypeError(f"{where}: task {task.name!r}'s batches must be (inputs, target), got {type(batch).__name__}")
    return batch[0], batch[1]


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Move one batch tensor; asynchronous from pinned memory on CUDA; uint8 images become float32
    in [0, 1] on the device."""
    if tensor.device != device:
        tensor = tensor.to(device, non_blocking=device.type == "cuda")
    if tensor.dtype == torch.uint8:
        tensor = tensor.float().div_(255)
    return tensor


def sampler(data, tasks: Sequence, homogeneous: bool, generator: torch.Generator, device: torch.device, where: str):
    """``sample(t, n) -> (inputs, targets)``: ``n`` random examples of task ``t`` on ``device``
    (fewer when the task has fewer), for the Fisher estimate of a mask update.

    A ``Split`` or dataset is indexed with ``torch.randperm`` of ``generator``; a loader over a
    map-style dataset samples that dataset; any other iterable contributes its first batches."""

    def from_split(t: int, n: int):
        size = data.inputs[t].shape[0]
        idx = torch.randperm(size, generator=generator)[: min(n, size)]
        return to_device(data.inputs[t][idx], device), to_device(data.targets[t][idx], device)

    def from_items(t: int, n: int):
        source = data if homogeneous else data[t]
        if isinstance(source, DataLoader) and is_map_dataset(source.dataset):
            source = source.dataset
        if is_map_dataset(source):
            idx = torch.randperm(len(source), generator=generator)[:n].tolist()
            batches = [default_collate([source[i] for i in idx])]
        else:
            batches, count = [], 0
            for batch in source:
                batches.append(batch)
                count += len(batch[0])
                if count >= n:
                    break
        xs, ys = [], []
        for batch in batches:
            if homogeneous:
                x, targets = homogeneous_batch(batch, tasks, where)
                y = targets[t]
            else:
                x, y = task_batch(batch, tasks[t], where)
            xs.append(x)
            ys.append(y)
        x, y = torch.cat(xs)[:n], torch.cat(ys)[:n]
        return to_device(x, device), to_device(y, device)

    if backing_split(data) is not None:
        data = backing_split(data)  # draws exactly what the same Split would
    return from_split if isinstance(data, Split) else from_items
