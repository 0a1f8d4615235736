"""Parameter-importance scores for the mask update (paper Eq. 9, 10 and Algorithm 2).

Every estimator returns float32 scores shaped like the masked trunk parameters, computed on the
dense trunk (no task mask in the forward), in eval mode (BatchNorm uses running statistics,
dropout is off) so that samples do not interact.

* ``fs``  — Eq. 10: ``1/N sum_n (grad log p(y_hat_n | x_n))**2`` with y_hat the predicted label.
* ``efs`` — Eq. 9: ``1/N sum_n sum_c p(c | x_n) (grad log p(c | x_n))**2``, exact over classes.
* ``grad2`` — Algorithm 2: ``(grad L_t)**2`` of the mini-batch loss.
* ``absgrad`` — Algorithm 2: ``|grad L_t|``.

Binary tasks use the Bernoulli likelihood; regression and dense (segmentation, depth) tasks use
the squared per-sample loss gradient for ``fs`` and ``efs``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

import fsmtl_kernels as fk
from fsmtl_kernels.fisher_engine import sum_grad_squared

from .data import Task
from .losses import CLASSIFICATION, class_log_probs, task_loss
from .model import MultiTaskModel

ESTIMATORS = ("fs", "efs", "grad2", "absgrad")


def task_scores(
    model: MultiTaskModel,
    task_index: int,
    task: Task,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    estimator: str = "fs",
    *,
    chunk_size: int = 32,
) -> list[torch.Tensor]:
    """Scores of the masked trunk parameters for one task on a batch of ``N`` examples.

    Args:
        inputs: ``[N, *input_shape]`` examples of the task, on the model's device.
        targets: the task's targets for them (used by ``grad2``/``absgrad`` and dense tasks).
        estimator: one of ``fs``, ``efs``, ``grad2``, ``absgrad``.

    Returns:
        float32 tensors shaped like ``model.masked_parameters()``.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator={estimator!r} is not one of {ESTIMATORS}")
    params = model.masked_parameters()
    n = inputs.shape[0]
    if n == 0:
        raise ValueError("inputs must hold at least one example")
    was_training = model.training
    model.eval()
    try:
        if estimator in ("grad2", "absgrad"):
            loss = task_loss(task, model(inputs, task_index), targets)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
            if estimator == "absgrad":
                return [g.detach().abs().float() for g in grads]
            return fk.fisher_accumulate([torch.zeros_like(p, dtype=torch.float32) for p in params], grads)
        out = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        for closure in _per_sample_closures(model, task_index, task, inputs, targets, estimator):
            sum_grad_squared(model.trunk, closure, params, out=out, scale=1.0 / n, chunk_size=chunk_size)
        return out
    finally:
        model.train(was_training)


def _per_sample_closures(model, task_index, task, inputs, targets, estimator) -> list[Callable[[], torch.Tensor]]:
    """Closures returning per-sample losses ``[N]`` whose squared gradients sum to the estimator."""
    if task.kind not in CLASSIFICATION:
        return [lambda: task_loss(task, model(inputs, task_index), targets, reduction="none")]
    if estimator == "fs":

        def predicted_label_nll() -> torch.Tensor:
            logp = class_log_probs(task, model(inputs, task_index))
            return -logp.gather(1, logp.argmax(1, keepdim=True)).squeeze(1)

        return [predicted_label_nll]
    with torch.no_grad():
        num_classes = class_log_probs(task, model(inputs, task_index)).shape[1]

    def weighted_class_nll(c: int) -> Callable[[], torch.Tensor]:
        # sqrt(p_c) as a constant weight: its square gives p_c * (grad log p_c)**2 per sample.
        def closure() -> torch.Tensor:
            logp = class_log_probs(task, model(inputs, task_index))
            return -logp[:, c] * logp[:, c].detach().exp().sqrt()

        return closure

    return [weighted_class_nll(c) for c in range(num_classes)]
