"""Binary classification: one logit per sample, Bernoulli likelihood, metrics of the positive class."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ._classification import METRICS, classification_metrics
from .kind import TaskKind, vector_outputs


class Binary(TaskKind):
    """Targets ``[n]`` float32 in {0, 1}; outputs logits ``[n, 1]`` (or ``[n]``); BCE loss."""

    name = "binary"
    metrics = METRICS
    primary_metric = "f1"
    target_dtype = torch.float32
    target_dims = 1
    classification = True

    def per_sample_loss(self, outputs, targets):
        return F.binary_cross_entropy_with_logits(outputs.reshape(-1), targets.float(), reduction="none")

    def log_probs(self, task, outputs):
        # The Bernoulli pair [log(1 - sigma(z)), log sigma(z)], as a two-class distribution.
        z = outputs.reshape(-1)
        return torch.stack([F.logsigmoid(-z), F.logsigmoid(z)], dim=1)

    def probabilities(self, task, outputs):
        """P(positive) ``[n]``."""
        return torch.sigmoid(outputs.reshape(-1))

    def labels(self, task, outputs):
        """1 where the logit is positive, else 0, ``[n]``."""
        return (outputs.reshape(-1) > 0).long()

    def metric_inputs(self, task, outputs, targets):
        return vector_outputs(self.name, task, outputs, targets)

    def compute_metrics(self, task, outputs, targets):
        y_true = targets.numpy().astype(np.int64)
        if not np.isin(y_true, (0, 1)).all():
            raise ValueError(f"binary task {task.name!r}: targets must be 0 or 1")
        return classification_metrics(y_true, (outputs > 0).numpy().astype(np.int64), "binary")


KIND = Binary()
