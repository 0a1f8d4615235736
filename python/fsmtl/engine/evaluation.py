"""Outputs and metrics of a trained model on a split, for :meth:`Trainer.predict` and
:meth:`Trainer.evaluate`: eval mode, no gradients, task masks applied when the strategy masks
the forward."""

from __future__ import annotations

import torch

from ..data import Split
from ..data.batches import homogeneous_batch, to_device
from ..tasks import task_kind
from ..tasks.checks import check_batch
from ..tasks.metrics import task_metrics
from .sources import check_split, train_source
from .steps import autocast, task_outputs


@torch.no_grad()
def outputs_and_targets(trainer, data, batch_size: int, name: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each task's outputs (float32, on the CPU) and targets on ``data``, in eval mode: a ``Split``
    in batches of ``batch_size`` (one trunk pass per batch when the tasks share it), datasets or
    loaders in one pass each, in their own order."""
    if isinstance(data, Split):
        check_split(data, trainer.tasks, trainer.homogeneous, name)
    was_training = trainer.model.training
    trainer.model.eval()
    device = trainer.device
    try:
        with autocast(trainer):
            if isinstance(data, Split):
                x = data.inputs[0]
                if trainer.homogeneous and all(xt is x for xt in data.inputs):  # one trunk pass when it can
                    parts = [
                        task_outputs(trainer, [to_device(x[i : i + batch_size], device)] * len(trainer.tasks))
                        for i in range(0, x.shape[0], batch_size)
                    ]
                    return [torch.cat([p[t].float().cpu() for p in parts]) for t in range(len(trainer.tasks))], list(
                        data.targets
                    )
                outs = []
                for t, x in enumerate(data.inputs):
                    mask = trainer.strategy.forward_mask(t)
                    chunks = [
                        trainer.model(to_device(x[i : i + batch_size], device), t, mask).float().cpu()
                        for i in range(0, x.shape[0], batch_size)
                    ]
                    outs.append(torch.cat(chunks))
                return outs, list(data.targets)
            # Evaluation: one pass over each loader in its own order, no cycling.
            source = train_source(data, trainer.tasks, trainer.homogeneous, batch_size, None, where=name)
            outs = [[] for _ in trainer.tasks]
            ys = [[] for _ in trainer.tasks]
            loaders = [source.loaders] if trainer.homogeneous else source.loaders
            for t_or_all, loader in enumerate(loaders):
                for batch in loader:
                    if trainer.homogeneous:
                        x, targets = homogeneous_batch(batch, trainer.tasks, name)
                        check_batch(trainer.tasks, [x] * len(trainer.tasks), targets, name)
                        x = to_device(x, device)
                        for t in range(len(trainer.tasks)):
                            outs[t].append(trainer.model(x, t, trainer.strategy.forward_mask(t)).float().cpu())
                            ys[t].append(targets[t])
                    else:
                        x, y = batch[0], batch[1]
                        check_batch([trainer.tasks[t_or_all]], [x], [y], name)
                        mask = trainer.strategy.forward_mask(t_or_all)
                        outs[t_or_all].append(trainer.model(to_device(x, device), t_or_all, mask).float().cpu())
                        ys[t_or_all].append(y)
            return [torch.cat(o) for o in outs], [torch.cat(y) for y in ys]
    finally:
        trainer.model.train(was_training)


PREDICTION_OUTPUTS = ("outputs", "probabilities", "labels")


@torch.no_grad()
def predict(trainer, data, batch_size: int, output: str = "outputs") -> list[torch.Tensor]:
    """``Trainer.predict``: each task's predictions on ``data`` (see there)."""
    if output not in PREDICTION_OUTPUTS:
        raise ValueError(f"output must be one of {PREDICTION_OUTPUTS}, got {output!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    tasks = trainer.tasks
    if isinstance(data, torch.Tensor):
        outputs = inputs_outputs(trainer, [data] * len(tasks), batch_size)
    elif isinstance(data, (list, tuple)) and data and all(isinstance(x, torch.Tensor) for x in data):
        if len(data) != len(tasks):
            raise ValueError(
                f"predict got {len(data)} input tensors for {len(tasks)} tasks: pass one tensor for every task "
                "(shared inputs) or one per task"
            )
        outputs = inputs_outputs(trainer, list(data), batch_size)
    else:
        outputs = outputs_and_targets(trainer, data, batch_size, "data")[0]
    if output == "outputs":
        return outputs
    kinds = [task_kind(task.kind) for task in tasks]
    convert = [kind.probabilities if output == "probabilities" else kind.labels for kind in kinds]
    return [f(task, out) for f, task, out in zip(convert, tasks, outputs)]


def inputs_outputs(trainer, inputs: list[torch.Tensor], batch_size: int) -> list[torch.Tensor]:
    """Each task's outputs (float32, CPU) on its inputs alone, in eval mode, ``batch_size`` at a
    time (one trunk pass per batch when the tasks share it)."""
    for t, x in enumerate(inputs):
        if x.dim() < 1 or x.shape[0] == 0:
            raise ValueError(f"the inputs of task {trainer.tasks[t].name!r} must be [N, ...] with N >= 1")
    was_training = trainer.model.training
    trainer.model.eval()
    device = trainer.device
    try:
        with autocast(trainer):
            if all(x is inputs[0] for x in inputs):
                x = inputs[0]
                parts = [
                    task_outputs(trainer, [to_device(x[i : i + batch_size], device)] * len(inputs))
                    for i in range(0, x.shape[0], batch_size)
                ]
                return [torch.cat([p[t].float().cpu() for p in parts]) for t in range(len(inputs))]
            outs = []
            for t, x in enumerate(inputs):
                mask = trainer.strategy.forward_mask(t)
                chunks = [
                    trainer.model(to_device(x[i : i + batch_size], device), t, mask).float().cpu()
                    for i in range(0, x.shape[0], batch_size)
                ]
                outs.append(torch.cat(chunks))
            return outs
    finally:
        trainer.model.train(was_training)


def evaluate(trainer, data, batch_size: int) -> list[dict[str, float]]:
    """Per-task metrics (:func:`fsmtl.tasks.task_metrics`) of ``trainer``'s model on ``data``."""
    outputs, targets = outputs_and_targets(trainer, data, batch_size, "data")
    return [task_metrics(task, out, y) for task, out, y in zip(trainer.tasks, outputs, targets)]
