"""The record of one task kind: its loss, likelihood, target checks and metrics.

A kind is one subclass instance in :data:`fsmtl.tasks.TASK_KINDS`; the losses, the metrics, the
data containers and the model builders look the kind up there instead of switching on its name.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping

import torch


class TaskKind(ABC):
    """Everything that depends on what a task predicts.

    Attributes:
        name: the ``Task.kind`` string.
        metrics: metric name -> True when higher is better, in the order they are reported.
        primary_metric: the metric that chooses hyper-parameters on validation.
        target_dtype, target_dims: what a target tensor of ``n`` samples must be.
        single_output: the head has one output (True) or one per class, at least 2 (False).
        classification: the model defines a class distribution (:meth:`log_probs`).
        dense: outputs are per pixel, so a model needs a resolution-preserving trunk.
    """

    name: str
    metrics: Mapping[str, bool]
    primary_metric: str
    target_dtype: torch.dtype
    target_dims: int
    single_output: bool = True
    classification: bool = False
    dense: bool = False

    def check_num_outputs(self, num_outputs: int) -> None:
        if self.single_output and num_outputs != 1:
            raise ValueError(f"Task.num_outputs must be 1 for kind {self.name!r}, got {num_outputs}")
        if not self.single_output and num_outputs < 2:
            raise ValueError(f"Task.num_outputs must be >= 2 classes for kind {self.name!r}, got {num_outputs}")

    def check_target(self, task, target: torch.Tensor, n: int, where: str) -> None:
        """Raise unless ``target`` holds ``n`` samples of the dtype and shape this kind needs."""
        if not isinstance(target, torch.Tensor):
            raise TypeError(f"{where}: targets must be torch.Tensor, got {type(target).__name__}")
        if target.shape[:1] != (n,):
            raise ValueError(f"{where}: targets have {tuple(target.shape)[:1]} samples, inputs have {n}")
        if target.dtype != self.target_dtype or target.dim() != self.target_dims:
            raise ValueError(
                f"{where}: task {task.name!r} of kind {self.name!r} needs targets of dtype {self.target_dtype} "
                f"with {self.target_dims} dims, got {target.dtype} with shape {tuple(target.shape)}"
            )

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """The training loss: scalar for ``reduction="mean"``, else per sample ``[N]``."""
        if reduction == "mean":
            return self.mean_loss(outputs, targets)
        return self.per_sample_loss(outputs, targets)

    @abstractmethod
    def per_sample_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Loss of each sample, ``[N]``."""

    def mean_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.per_sample_loss(outputs, targets).mean()

    def log_probs(self, task, outputs: torch.Tensor) -> torch.Tensor:
        """Log-probabilities ``[N, C]`` of the predictive distribution (classification kinds)."""
        raise ValueError(f"task {task.name!r} of kind {self.name!r} has no class distribution")

    def probabilities(self, task, outputs: torch.Tensor) -> torch.Tensor:
        """The predicted probabilities of a batch of head outputs (classification kinds); a kind
        that predicts values (regression, depth) returns its outputs."""
        return outputs

    def labels(self, task, outputs: torch.Tensor) -> torch.Tensor:
        """The predicted labels (int64) of a batch of head outputs (classification kinds); a kind
        that predicts values returns its outputs."""
        return outputs

    def metric_inputs(self, task, outputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Check the shapes of one split's ``outputs``/``targets`` (on the CPU) and return them
        in the layout :meth:`compute_metrics` takes."""
        return outputs, targets

    @abstractmethod
    def compute_metrics(self, task, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        """The metrics of :attr:`metrics` from the output of :meth:`metric_inputs`."""


def vector_outputs(kind: str, task, outputs: torch.Tensor, targets: torch.Tensor):
    """``[n]`` (or ``[n, 1]``) outputs against ``[n]`` targets, as two ``[n]`` tensors."""
    if outputs.dim() == 2 and outputs.shape[1] == 1:
        outputs = outputs[:, 0]
    if outputs.dim() != 1 or targets.dim() != 1:
        raise ValueError(
            f"{kind} task {task.name!r}: outputs must be [n] (or [n, 1]) and targets [n], "
            f"got {tuple(outputs.shape)} and {tuple(targets.shape)}"
        )
    return outputs, targets
