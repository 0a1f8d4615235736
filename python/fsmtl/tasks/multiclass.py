"""Multiclass classification: C logits per sample, softmax likelihood, macro-averaged metrics."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._classification import METRICS, classification_metrics
from .kind import TaskKind


class Multiclass(TaskKind):
    """Targets ``[n]`` int64 in [0, C); outputs logits ``[n, C]``; cross-entropy loss."""

    name = "multiclass"
    metrics = METRICS
    primary_metric = "f1"
    target_dtype = torch.int64
    target_dims = 1
    single_output = False
    classification = True

    def per_sample_loss(self, outputs, targets):
        return F.cross_entropy(outputs, targets, reduction="none")

    def log_probs(self, task, outputs):
        return F.log_softmax(outputs, dim=1)

    def probabilities(self, task, outputs):
        """Softmax over the C classes, ``[n, C]``."""
        return torch.softmax(outputs, dim=1)

    def labels(self, task, outputs):
        """The most likely class, ``[n]``."""
        return outputs.argmax(dim=1)

    def metric_inputs(self, task, outputs, targets):
        n = targets.shape[0]
        if outputs.shape != (n, task.num_outputs) or targets.dim() != 1:
            raise ValueError(
                f"multiclass task {task.name!r}: outputs must be [n, {task.num_outputs}] logits and "
                f"targets [n], got {tuple(outputs.shape)} and {tuple(targets.shape)}"
            )
        return outputs, targets

    def compute_metrics(self, task, outputs, targets):
        return classification_metrics(targets.numpy(), outputs.argmax(dim=1).numpy(), "macro")


KIND = Multiclass()
