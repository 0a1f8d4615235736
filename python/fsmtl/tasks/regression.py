"""Scalar regression: squared-error loss, MSE and MAE."""

from __future__ import annotations

import torch
from sklearn.metrics import mean_absolute_error, mean_squared_error

from .kind import TaskKind, vector_outputs


class Regression(TaskKind):
    """Targets ``[n]`` float32; outputs ``[n, 1]`` (or ``[n]``); squared error."""

    name = "regression"
    metrics = {"mse": False, "mae": False}
    primary_metric = "mse"
    target_dtype = torch.float32
    target_dims = 1

    def per_sample_loss(self, outputs, targets):
        return (outputs.reshape(-1) - targets.float()).square()

    def metric_inputs(self, task, outputs, targets):
        return vector_outputs(self.name, task, outputs, targets)

    def compute_metrics(self, task, outputs, targets):
        y_true, y_pred = targets.to(torch.float64).numpy(), outputs.to(torch.float64).numpy()
        return {"mse": float(mean_squared_error(y_true, y_pred)), "mae": float(mean_absolute_error(y_true, y_pred))}


KIND = Regression()
