"""Per-task losses and the log-likelihoods the Fisher estimators differentiate; each task kind
(:mod:`fsmtl.tasks`) defines its own."""

from __future__ import annotations

import torch

from .registry import task_kind
from .task import Task


def task_loss(task: Task, outputs: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """The training loss of ``task``: scalar (``reduction="mean"``) or per sample ``[N]`` (``"none"``).

    binary: BCE with logits ``[N, 1]``; multiclass: cross-entropy ``[N, C]``; regression: squared
    error ``[N, 1]``; segmentation: pixel cross-entropy ``[N, C, H, W]`` ignoring label -1;
    depth: L1 over valid pixels (target != 0) ``[N, 1, H, W]``. Per-sample losses of dense tasks are
    the mean over that sample's valid pixels.
    """
    return task_kind(task.kind).loss(outputs, targets, reduction)


def class_log_probs(task: Task, outputs: torch.Tensor) -> torch.Tensor:
    """Log-probabilities ``[N, C]`` of a classification task's predictive distribution
    (binary: the Bernoulli pair ``[log(1 - sigma(z)), log sigma(z)]``)."""
    return task_kind(task.kind).log_probs(task, outputs)
