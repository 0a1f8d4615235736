"""A multi-task benchmark: its tasks and its train/val/test splits, checked against each task
kind's dtype and shape (:class:`Benchmark`), and every value of every split before training
(:meth:`Benchmark.check`), with errors that name the split, the task and the file."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..tasks import TASK_KINDS, Task
from ..tasks.checks import check_inputs, check_targets
from .datasets import split_datasets
from .split import Split


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
        sources: where the data was read from, for messages: ``"<split>/<task>"``, ``"<split>"``,
            ``"<task>"`` or ``"*"`` (most specific first) to a description of the file(s); empty for
            generated data.
    """

    name: str
    tasks: list[Task]
    homogeneous: bool
    input_shape: tuple[int, ...]
    train: Split
    val: Split
    test: Split
    sources: dict[str, str] = field(default_factory=dict)

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

    SPLITS = ("train", "val", "test")

    def source(self, split: str, task: str) -> str | None:
        """The file(s) the ``split`` data of ``task`` came from (None for generated data)."""
        for key in (f"{split}/{task}", split, task, "*"):
            if key in self.sources:
                return self.sources[key]
        return None

    def where(self, split: str, task: str) -> str:
        """How messages name one split of one task: benchmark, split and file."""
        source = self.source(split, task)
        return f"benchmark {self.name!r} {split} split" + (f" (from {source})" if source else "")

    def check(self) -> None:
        """Every split of every task holds samples, finite inputs and targets of its kind's range
        (whole tensors, once): ``ValueError`` naming the benchmark, split, task and file."""
        for split_name in self.SPLITS:
            split = getattr(self, split_name)
            checked = set()
            for task, x, y in zip(self.tasks, split.inputs, split.targets, strict=True):
                where = self.where(split_name, task.name)
                if x.shape[0] == 0:
                    raise ValueError(f"{where}: task {task.name!r} has no samples (empty split)")
                if id(x) not in checked:
                    check_inputs(task, x, where)
                    checked.add(id(x))
                check_targets(task, y, int(x.shape[0]), where)

    @property
    def num_tasks(self) -> int:
        """Number of tasks T."""
        return len(self.tasks)

    def datasets(self, split: str = "train"):
        """``split`` (``"train"``, ``"val"``, ``"test"``) as ``torch.utils.data`` datasets for
        ``Trainer.fit``/``evaluate``: one (homogeneous) or one per task (heterogeneous)."""
        if split not in ("train", "val", "test"):
            raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
        return split_datasets(getattr(self, split), self.homogeneous)
