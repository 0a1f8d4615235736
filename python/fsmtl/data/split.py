"""One split (train, val or test) of a multi-task benchmark: one input and one target tensor per
task, in memory, so that a trainer slices them with index tensors and moves them to a device
itself. ``__post_init__`` checks the invariants the trainer relies on (one input and one target
tensor per task, matching sample counts), so a user who builds a :class:`Split` from their own data
gets a clear ``ValueError`` instead of a shape error deep inside training."""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
