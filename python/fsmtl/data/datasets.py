"""An in-memory :class:`~fsmtl.data.Split` as ``torch.utils.data`` datasets, for users (and the
Trainer) that take their data through ``torch.utils.data``."""

from __future__ import annotations

from torch.utils.data import Dataset

from .split import Split


class SplitDataset(Dataset):
    """One task's (heterogeneous) or all tasks' (homogeneous) samples of a :class:`Split` as a
    map-style dataset: items ``(input, target)`` or ``(input, [y_1, ..., y_T])``."""

    def __init__(self, split: Split, task: int | None = None) -> None:
        self.split = split
        self.task = task

    def __len__(self) -> int:
        return int(self.split.inputs[0 if self.task is None else self.task].shape[0])

    def __getitem__(self, i):
        # ``i`` may be a list of indices: the Trainer's loader then fetches a whole batch with one
        # index op per tensor instead of batch_size items and a collate.
        if self.task is None:
            return self.split.inputs[0][i], [y[i] for y in self.split.targets]
        return self.split.inputs[self.task][i], self.split.targets[self.task][i]


def backing_split(data) -> Split | None:
    """The in-memory split behind ``data`` when it is made of :class:`SplitDataset` s (so the
    Trainer can check it whole once instead of every batch's values), else None."""
    if isinstance(data, SplitDataset) and data.task is None:
        return data.split
    if isinstance(data, (list, tuple)) and data and all(isinstance(d, SplitDataset) for d in data):
        if all(d.split is data[0].split and d.task == t for t, d in enumerate(data)):
            return data[0].split
    return None


def split_datasets(split: Split, homogeneous: bool) -> Dataset | list[Dataset]:
    """A ``Split`` as what ``fit`` accepts from ``torch.utils.data`` users: one dataset
    (homogeneous) or one per task."""
    return SplitDataset(split) if homogeneous else [SplitDataset(split, t) for t in range(len(split.inputs))]
