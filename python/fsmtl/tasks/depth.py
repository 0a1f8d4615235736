"""Depth estimation: per-pixel L1 loss and the MTAN / LibMTL depth errors, over valid pixels (target != 0)."""

from __future__ import annotations

import torch

from .kind import TaskKind


class Depth(TaskKind):
    """Targets and outputs ``[n, 1, H, W]`` float32, 0 marking invalid pixels; L1 over valid
    pixels, per sample the mean over its valid pixels."""

    name = "depth"
    metrics = {"abs_err": False, "rel_err": False}
    primary_metric = "abs_err"
    target_dtype = torch.float32
    target_dims = 4
    dense = True

    def check_target(self, task, target, n, where):
        super().check_target(task, target, n, where)
        if target.shape[1] != 1:
            raise ValueError(f"{where}: depth targets must be [n, 1, H, W], got {tuple(target.shape)}")

    def per_sample_loss(self, outputs, targets):
        valid = (targets != 0).float()
        err = ((outputs - targets).abs() * valid).flatten(1)
        return err.sum(1) / valid.flatten(1).sum(1).clamp_min(1)

    def mean_loss(self, outputs, targets):
        valid = (targets != 0).float()
        err = ((outputs - targets).abs() * valid).flatten(1)
        return err.sum() / valid.sum().clamp_min(1)

    def metric_inputs(self, task, outputs, targets):
        if outputs.dim() != 4 or outputs.shape[1] != 1 or targets.shape != outputs.shape:
            raise ValueError(
                f"depth task {task.name!r}: outputs and targets must both be [n, 1, H, W], "
                f"got {tuple(outputs.shape)} and {tuple(targets.shape)}"
            )
        return outputs, targets

    def compute_metrics(self, task, outputs, targets):
        return depth_errors(outputs, targets)


def depth_errors(predictions: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """MTAN / LibMTL depth errors over valid pixels (target != 0).

    ``abs_err`` = mean |pred - true|, ``rel_err`` = mean |pred - true| / true, both averaged over all
    valid pixels of the set (not per image). ``predictions`` and ``targets`` ``[n, 1, H, W]`` float.
    """
    valid = targets != 0
    count = int(valid.sum())
    if count == 0:
        raise ValueError("depth targets have no valid pixel (all 0)")
    pred, true = predictions[valid].to(torch.float64), targets[valid].to(torch.float64)
    err = (pred - true).abs()
    return {"abs_err": float(err.sum() / count), "rel_err": float((err / true.abs()).sum() / count)}


KIND = Depth()
