"""Outputs and metrics of a trained model on a split, for :meth:`Trainer.predict` and
:meth:`Trainer.evaluate`: eval mode, no gradients, task masks applied when the strategy masks
the forward."""

from __future__ import annotations

import torch

from ..data import Split
from ..data.batches import homogeneous_batch, to_device
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


def evaluate(trainer, data, batch_size: int) -> list[dict[str, float]]:
    """Per-task metrics (:func:`fsmtl.tasks.task_metrics`) of ``trainer``'s model on ``data``."""
    outputs, targets = outputs_and_targets(trainer, data, batch_size, "data")
    return [task_metrics(task, out, y) for task, out, y in zip(trainer.tasks, outputs, targets)]
