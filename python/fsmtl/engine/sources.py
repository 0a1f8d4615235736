"""Adapting training/evaluation data to the Trainer: in-memory ``Split``s, ``torch.utils.data``
datasets and loaders, or any iterable of batches.

What the Trainer accepts as data (``fit``, ``evaluate``, the Fisher samples of a mask update):

* a :class:`~fsmtl.data.Split` (in memory; sliced with index tensors, the fastest path);
* homogeneous tasks: one map-style ``Dataset`` whose items are ``(input, targets)``, or one
  ``DataLoader``/iterable whose batches are ``(inputs, targets)``; ``targets`` holds one target per
  task, as a sequence in task order or a mapping by task name (``(inputs, y_1, ..., y_T)`` as
  from a ``TensorDataset`` also works);
* heterogeneous tasks: a sequence of T datasets or loaders, one per task, each item/batch
  ``(inputs, target)``. The longest sets the epoch; shorter ones start again when exhausted.

A dataset is batched by the Trainer with a ``RandomSampler`` drawing from the Trainer's data
generator, so its order is ``torch.randperm(n)`` of that generator, exactly as for a ``Split``:
the same data as a ``Split`` or as a ``Dataset`` trains the same (tested). ``uint8`` inputs are
images in [0, 255]; they stay uint8 until the batch is on the device (4x less to copy) and become
float32 in [0, 1] there.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler

from ..data import Split, SplitDataset
from ..data.batches import homogeneous_batch, is_map_dataset, task_batch
from ..tasks.checks import check_inputs, check_targets

Batch = tuple[list[torch.Tensor], list[torch.Tensor]]
"""T inputs and T targets of one step (homogeneous: the same input tensor object T times)."""


class SplitSource:
    """Batches of an in-memory split, in the order of ``torch.randperm`` of ``generator``."""

    def __init__(self, split: Split, homogeneous: bool, batch_size: int, generator: torch.Generator) -> None:
        self.split = split
        self.homogeneous = homogeneous
        self.batch_size = batch_size
        self.generator = generator
        self.sizes = split.sizes
        self.steps_per_epoch = -(-max(self.sizes) // batch_size)

    def _orders(self) -> list[torch.Tensor]:
        if self.homogeneous:
            order = torch.randperm(self.sizes[0], generator=self.generator)
            return [order] * len(self.sizes)
        length = self.steps_per_epoch * self.batch_size
        orders = []
        for n in self.sizes:
            reps = -(-length // n)
            orders.append(torch.cat([torch.randperm(n, generator=self.generator) for _ in range(reps)])[:length])
        return orders

    def epoch(self) -> Iterator[Batch]:
        orders = self._orders()  # drawn now, at the epoch start, so a resumed epoch redraws them identically
        split, bs = self.split, self.batch_size
        for i in range(self.steps_per_epoch):
            idx = [o[i * bs : (i + 1) * bs] for o in orders]
            if self.homogeneous:
                x = split.inputs[0][idx[0]]
                yield [x] * len(split.inputs), [y[idx[0]] for y in split.targets]
            else:
                yield [x[j] for x, j in zip(split.inputs, idx)], [y[j] for y, j in zip(split.targets, idx)]


class LoaderSource:
    """Batches of one loader/iterable (homogeneous) or of one loader per task (heterogeneous; the
    longest sets the epoch, shorter ones are iterated again when they run out)."""

    def __init__(self, loaders: Iterable | Sequence[Iterable], tasks: Sequence, homogeneous: bool, where: str) -> None:
        self.loaders = loaders
        self.tasks = tasks
        self.homogeneous = homogeneous
        self.where = where
        if homogeneous:
            self.steps_per_epoch = len(loaders) if hasattr(loaders, "__len__") else None
        else:
            lengths = [len(loader) if hasattr(loader, "__len__") else None for loader in loaders]
            if any(n is None for n in lengths):
                raise TypeError(f"{where}: heterogeneous per-task loaders need a length (to know the longest)")
            if min(lengths) == 0:
                empty = self.tasks[lengths.index(0)].name
                raise ValueError(f"{where}: the loader of task {empty!r} is empty")
            self.steps_per_epoch = max(lengths)

    def epoch(self) -> Iterator[Batch]:
        if self.homogeneous:
            for batch in self.loaders:
                x, ys = homogeneous_batch(batch, self.tasks, self.where)
                yield [x] * len(self.tasks), ys
            return
        iterators = [iter(loader) for loader in self.loaders]
        for _ in range(self.steps_per_epoch):
            xs, ys = [], []
            for t, (task, loader) in enumerate(zip(self.tasks, self.loaders)):
                try:
                    batch = next(iterators[t])
                except StopIteration:
                    iterators[t] = iter(loader)
                    batch = next(iterators[t])
                x, y = task_batch(batch, task, self.where)
                xs.append(x)
                ys.append(y)
            yield xs, ys


def _loader(dataset: Dataset, batch_size: int, generator, num_workers: int, pin_memory: bool) -> DataLoader:
    sampler = RandomSampler(dataset, generator=generator) if generator is not None else None
    if isinstance(dataset, SplitDataset):
        # Same order (the BatchSampler groups the same sampler), one gather per tensor per batch.
        return DataLoader(
            dataset,
            batch_size=None,
            sampler=BatchSampler(sampler if sampler is not None else range(len(dataset)), batch_size, drop_last=False),
            num_workers=num_workers,
            pin_memory=pin_memory,
            persistent_workers=num_workers > 0,
        )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
    )


def train_source(
    data,
    tasks: Sequence,
    homogeneous: bool,
    batch_size: int | None,
    generator: torch.Generator | None,
    *,
    num_workers: int = 0,
    pin_memory: bool = False,
    where: str = "train",
) -> SplitSource | LoaderSource:
    """The batch source of ``data`` (see the module docstring). Datasets are batched with
    ``batch_size`` (required for them and for a ``Split``); loaders keep their own batch size.
    ``generator=None`` (evaluation) keeps the data's order."""
    needs_batch = isinstance(data, Split) or is_map_dataset(data)
    if not homogeneous and isinstance(data, Sequence) and not isinstance(data, Split):
        needs_batch = any(is_map_dataset(d) for d in data)
    if needs_batch and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if isinstance(data, Split):
        return SplitSource(data, homogeneous, batch_size, generator) if generator is not None else None
    if homogeneous:
        if is_map_dataset(data):
            if len(data) == 0:
                raise ValueError(f"{where}: the dataset is empty")
            data = _loader(data, batch_size, generator, num_workers, pin_memory)
        elif isinstance(data, (torch.Tensor, str, bytes, Mapping)) or not isinstance(data, Iterable):
            raise TypeError(
                f"{where} must be a fsmtl.data.Split, a torch Dataset or a DataLoader/iterable of "
                f"(inputs, targets) batches, got {type(data).__name__}"
            )
        if hasattr(data, "__len__") and len(data) == 0:
            raise ValueError(f"{where}: the loader is empty")
        return LoaderSource(data, tasks, True, where)
    if not isinstance(data, Sequence) or isinstance(data, (str, torch.Tensor)):
        raise TypeError(
            f"{where}: heterogeneous tasks need a fsmtl.data.Split or one dataset/loader per task, "
            f"got {type(data).__name__}"
        )
    if len(data) != len(tasks):
        raise ValueError(f"{where}: {len(data)} datasets/loaders for {len(tasks)} tasks")
    loaders = []
    for task, d in zip(tasks, data):
        if is_map_dataset(d):
            if len(d) == 0:
                raise ValueError(f"{where}: the dataset of task {task.name!r} is empty")
            d = _loader(d, batch_size, generator, num_workers, pin_memory)
        elif not isinstance(d, Iterable) or isinstance(d, torch.Tensor):
            raise TypeError(f"{where}: the data of task {task.name!r} must be a Dataset or loader")
        loaders.append(d)
    return LoaderSource(loaders, tasks, False, where)


def check_split(split: Split, tasks: Sequence, homogeneous: bool, name: str) -> None:
    """An in-memory split: one input/target per task, non-empty, homogeneous inputs shared,
    targets of the right dtype, shape and range, no NaN (whole tensors, once per call)."""
    if len(split.inputs) != len(tasks):
        raise ValueError(f"{name} has {len(split.inputs)} tasks but the trainer has {len(tasks)}")
    if homogeneous:
        first = split.inputs[0]
        for task, x in zip(tasks[1:], split.inputs[1:]):
            if x is not first and (x.shape != first.shape or not torch.equal(x, first)):
                raise ValueError(
                    f"{name}: homogeneous training shares one input tensor, but task {task.name!r} has "
                    "different inputs; pass homogeneous=False to train each task on its own inputs"
                )
    for t, (task, x, y) in enumerate(zip(tasks, split.inputs, split.targets)):
        if homogeneous and t > 0 and x is split.inputs[0]:
            check_targets(task, y, x.shape[0], name)
            continue
        if x.shape[0] == 0:
            raise ValueError(f"{name}: task {task.name!r} has no samples (empty data)")
        check_inputs(task, x, name)
        check_targets(task, y, x.shape[0], name)
