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
from typing import NamedTuple

import torch

import fsmtl_kernels as fk
from fsmtl_kernels.fisher_engine import sum_grad_squared

from .model import MultiTaskModel
from .tasks import Task, task_kind
from .tasks.losses import class_log_probs, task_loss

Closure = Callable[[], torch.Tensor]


class Estimator(NamedTuple):
    """A score estimator: its table label and how it scores (``scores(model, t, task, inputs,
    targets, params, chunk_size)`` -> float32 tensors shaped like ``params``)."""

    label: str
    scores: Callable[..., list[torch.Tensor]]


def _minibatch_gradient(model, task_index, task, inputs, targets, params) -> list[torch.Tensor]:
    loss = task_loss(task, model(inputs, task_index), targets)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def _grad2(model, task_index, task, inputs, targets, params, chunk_size) -> list[torch.Tensor]:
    grads = _minibatch_gradient(model, task_index, task, inputs, targets, params)
    return fk.fisher_accumulate([torch.zeros_like(p, dtype=torch.float32) for p in params], grads)


def _absgrad(model, task_index, task, inputs, targets, params, chunk_size) -> list[torch.Tensor]:
    grads = _minibatch_gradient(model, task_index, task, inputs, targets, params)
    return [g.detach().abs().float() for g in grads]


def _fisher(closures: Callable[..., list[Closure]]) -> Callable[..., list[torch.Tensor]]:
    """An estimator ``1/N sum`` of squared per-sample gradients of the losses ``closures`` build;
    non-classification tasks use their squared per-sample loss gradient."""

    def scores(model, task_index, task, inputs, targets, params, chunk_size) -> list[torch.Tensor]:
        if task_kind(task.kind).classification:
            per_sample = closures(model, task_index, task, inputs)
        else:
            per_sample = [lambda: task_loss(task, model(inputs, task_index), targets, reduction="none")]
        out = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        for closure in per_sample:
            sum_grad_squared(model.trunk, closure, params, out=out, scale=1.0 / inputs.shape[0], chunk_size=chunk_size)
        return out

    return scores


def _predicted_label(model, task_index, task, inputs) -> list[Closure]:
    def predicted_label_nll() -> torch.Tensor:
        logp = class_log_probs(task, model(inputs, task_index))
        return -logp.gather(1, logp.argmax(1, keepdim=True)).squeeze(1)

    return [predicted_label_nll]


def _expected_over_classes(model, task_index, task, inputs) -> list[Closure]:
    with torch.no_grad():
        num_classes = class_log_probs(task, model(inputs, task_index)).shape[1]

    def weighted_class_nll(c: int) -> Closure:
        # sqrt(p_c) as a constant weight: its square gives p_c * (grad log p_c)**2 per sample.
        def closure() -> torch.Tensor:
            logp = class_log_probs(task, model(inputs, task_index))
            return -logp[:, c] * logp[:, c].detach().exp().sqrt()

        return closure

    return [weighted_class_nll(c) for c in range(num_classes)]


# Each estimator is also a method of the comparison: FisherSparse with that score.
ESTIMATORS: dict[str, Estimator] = {
    "fs": Estimator("FS", _fisher(_predicted_label)),
    "efs": Estimator("EFS", _fisher(_expected_over_classes)),
    "grad2": Estimator("GRAD2", _grad2),
    "absgrad": Estimator("ABSGRAD", _absgrad),
}


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
        estimator: a name in :data:`ESTIMATORS`: ``fs``, ``efs``, ``grad2``, ``absgrad``.

    Returns:
        float32 tensors shaped like ``model.masked_parameters()``.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator={estimator!r} is not one of {tuple(ESTIMATORS)}")
    params = model.masked_parameters()
    if inputs.shape[0] == 0:
        raise ValueError("inputs must hold at least one example")
    was_training = model.training
    model.eval()
    try:
        return ESTIMATORS[estimator].scores(model, task_index, task, inputs, targets, params, chunk_size)
    finally:
        model.train(was_training)
