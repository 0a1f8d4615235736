"""The containers every benchmark and loader returns: :class:`Task`, :class:`Split`, :class:`Benchmark`.

They are plain tensors in memory, so a trainer slices them with index tensors and moves them to a
device itself. ``__post_init__`` checks the invariants the trainer relies on (one input and one
target tensor per task, matching sample counts, the dtype and shape each task kind implies), so a
user who builds a :class:`Benchmark` from their own data gets a clear ``ValueError`` instead of a
shape error deep inside training.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..tasks import TASK_KINDS


@dataclass(frozen=True)
class Task:
    """One task of a benchmark.

    Attributes:
        name: short identifier, unique within a benchmark (used as a column name in result tables).
        kind: a name in :data:`fsmtl.tasks.TASK_KINDS`: ``"binary"``, ``"multiclass"``, ``"regression"``,
            ``"segmentation"`` or ``"depth"``.
        num_outputs: width of the task head: 1 for binary, regression and depth; the number of
            classes C for multiclass and segmentation.
    """

    name: str
    kind: str
    num_outputs: int

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"Task.name must be a non-empty string, got {self.name!r}")
        if not isinstance(self.kind, str) or self.kind not in TASK_KINDS:
            raise ValueError(f"Task.kind must be one of {tuple(TASK_KINDS)}, got {self.kind!r}")
        if isinstance(self.num_outputs, bool) or not isinstance(self.num_outputs, int):
            raise TypeError(f"Task.num_outputs must be an int, got {type(self.num_outputs).__name__}")
        TASK_KINDS[self.kind].check_num_outputs(self.num_outputs)


@dataclass
class Split:
    """One split (train, val or test) of a benchmark.

    Attributes:
        inputs: T float32 tensors ``[n_t, *input_shape]``. A homogeneous benchmark holds the *same*
            tensor object T times (so ``inputs[0] is inputs[1]``), which lets a trainer run one
            forward pass of the shared trunk for all heads.
        targets: T tensors, one per task: binary ``[n_t]`` float32 in {0, 1}; multiclass ``[n_t]``
            int64 in [0, C); regression ``[n_t]`` float32; segmentation ``[n_t, H, W]`` int64 with
            -1 for ignored pixels; depth ``[n_t, 1, H, W]`` float32 with 0 for invalid pixels.
    """

    inputs: list[torch.Tensor]
    targets: list[torch.Tensor]

    def __post_init__(self) -> None:
        if len(self.inputs) != len(self.targets):
            raise ValueError(f"Split: {len(self.inputs)} input tensors but {len(self.targets)} target tensors")
        for t, (x, y) in enumerate(zip(self.inputs, self.targets, strict=True)):
            if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
                raise TypeError(f"Split: inputs[{t}] and targets[{t}] must be torch.Tensor")
            if x.dtype != torch.float32:
                raise ValueError(f"Split: inputs[{t}] must be float32, got {x.dtype}")
            if y.shape[:1] != x.shape[:1]:
                raise ValueError(f"Split: inputs[{t}] has {x.shape[0]} samples but targets[{t}] has {y.shape[:1]}")

    @property
    def sizes(self) -> list[int]:
        """Number of samples of each task (``n_t``)."""
        return [int(x.shape[0]) for x in self.inputs]


@dataclass
class Benchmark:
    """A multi-task benchmark: its tasks and its train/val/test splits.

    Attributes:
        name: benchmark name (as in :data:`fsmtl.data.BENCHMARKS` for the embedded ones).
        tasks: the T tasks, in the order of ``Split.inputs`` / ``Split.targets``.
        homogeneous: True when all tasks share one input tensor per split (one input, T heads);
            False when each task has its own inputs (heterogeneous, as DKL-mnist).
        input_shape: shape of one sample, e.g. ``(64,)`` or ``(1, 28, 28)``.
        train, val, test: the splits. Hyper-parameters are chosen on ``val``, results reported on ``test``.
    """

    name: str
    tasks: list[Task]
    homogeneous: bool
    input_shape: tuple[int, ...]
    train: Split
    val: Split
    test: Split

    def __post_init__(self) -> None:
        self.input_shape = tuple(int(s) for s in self.input_shape)
        names = [task.name for task in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"Benchmark {self.name!r}: task names must be unique, got {names}")
        for split_name in ("train", "val", "test"):
            split = getattr(self, split_name)
            where = f"Benchmark {self.name!r} {split_name}"
            if len(split.inputs) != len(self.tasks):
                raise ValueError(f"{where}: {len(split.inputs)} input tensors for {len(self.tasks)} tasks")
            for t, (task, x, y) in enumerate(zip(self.tasks, split.inputs, split.targets, strict=True)):
                if tuple(x.shape[1:]) != self.input_shape:
                    raise ValueError(
                        f"{where}: inputs[{t}] has sample shape {tuple(x.shape[1:])}, "
                        f"expected input_shape {self.input_shape}"
                    )
                if self.homogeneous and x is not split.inputs[0]:
                    raise ValueError(f"{where}: a homogeneous benchmark must hold the same input tensor for every task")
                TASK_KINDS[task.kind].check_target(task, y, int(x.shape[0]), f"{where} task {task.name!r}")

    @property
    def num_tasks(self) -> int:
        """Number of tasks T."""
        return len(self.tasks)

    def datasets(self, split: str = "train"):
        """``split`` (``"train"``, ``"val"``, ``"test"``) as ``torch.utils.data`` datasets for
        ``Trainer.fit``/``evaluate``: one (homogeneous) or one per task (heterogeneous)."""
        from .loaders import split_datasets

        if split not in ("train", "val", "test"):
            raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
        return split_datasets(getattr(self, split), self.homogeneous)
