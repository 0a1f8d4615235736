"""Per-task losses and the log-likelihoods the Fisher estimators differentiate."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .data import Task

CLASSIFICATION = ("binary", "multiclass")


def task_loss(task: Task, outputs: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """The training loss of ``task``: scalar (``reduction="mean"``) or per sample ``[N]`` (``"none"``).

    binary: BCE with logits ``[N, 1]``; multiclass: cross-entropy ``[N, C]``; regression: squared
    error ``[N, 1]``; segmentation: pixel cross-entropy ``[N, C, H, W]`` ignoring label -1;
    depth: L1 over valid pixels (target != 0) ``[N, 1, H, W]``. Per-sample losses of dense tasks are
    the mean over that sample's valid pixels.
    """
    kind = task.kind
    if kind == "binary":
        per = F.binary_cross_entropy_with_logits(outputs.reshape(-1), targets.float(), reduction="none")
    elif kind == "multiclass":
        per = F.cross_entropy(outputs, targets, reduction="none")
    elif kind == "regression":
        per = (outputs.reshape(-1) - targets.float()).square()
    elif kind == "segmentation":
        pix = F.cross_entropy(outputs, targets, ignore_index=-1, reduction="none")
        valid = (targets != -1).flatten(1)
        per = pix.flatten(1).sum(1) / valid.sum(1).clamp_min(1)
        if reduction == "mean":
            return pix.flatten().sum() / valid.sum().clamp_min(1)
    elif kind == "depth":
        valid = (targets != 0).float()
        err = ((outputs - targets).abs() * valid).flatten(1)
        per = err.sum(1) / valid.flatten(1).sum(1).clamp_min(1)
        if reduction == "mean":
            return err.sum() / valid.sum().clamp_min(1)
    else:
        raise ValueError(f"task.kind={kind!r} is not a known task kind")
    return per.mean() if reduction == "mean" else per


def class_log_probs(task: Task, outputs: torch.Tensor) -> torch.Tensor:
    """Log-probabilities ``[N, C]`` of a classification task's predictive distribution
    (binary: the Bernoulli pair ``[log(1 - sigma(z)), log sigma(z)]``)."""
    if task.kind == "binary":
        z = outputs.reshape(-1)
        return torch.stack([F.logsigmoid(-z), F.logsigmoid(z)], dim=1)
    if task.kind == "multiclass":
        return F.log_softmax(outputs, dim=1)
    raise ValueError(f"task {task.name!r} of kind {task.kind!r} has no class distribution")
