"""The Trainer: a model, the task list and a strategy; the strategy owns every method decision."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .data import Split, Task
from .losses import task_loss
from .model import MultiTaskModel
from .strategies.base import Strategy, TrainingContext


class Trainer:
    """Trains a :class:`MultiTaskModel` with a :class:`~fsmtl.strategies.Strategy`.

    Args:
        model: trunk + one head per task.
        tasks: the T tasks, in head order.
        strategy: decides masks and how per-task gradients become the update.
        optimizer: over ``model.parameters()``.
        homogeneous: True when all tasks share inputs (one batch feeds T heads); False when
            each task has its own data (each step draws one batch per task, Algorithm 1 of the
            paper's appendix).
        seed: seeds the batch order and the strategy's sampling.
    """

    def __init__(
        self,
        model: MultiTaskModel,
        tasks: Sequence[Task],
        strategy: Strategy,
        optimizer: torch.optim.Optimizer,
        *,
        homogeneous: bool = True,
        seed: int = 0,
    ) -> None:
        if not isinstance(model, MultiTaskModel):
            raise TypeError(f"model must be a MultiTaskModel, got {type(model).__name__}")
        if len(tasks) != model.num_tasks:
            raise ValueError(f"tasks has {len(tasks)} entries but the model has {model.num_tasks} heads")
        if not isinstance(strategy, Strategy):
            raise TypeError(f"strategy must be a Strategy, got {type(strategy).__name__}")
        self.model = model
        self.tasks = list(tasks)
        self.strategy = strategy
        self.optimizer = optimizer
        self.homogeneous = homogeneous
        # Separate streams: the strategy's sampling must not shift the batch order, so that two
        # strategies with the same seed see the same batches.
        self.generator = torch.Generator().manual_seed(seed)
        self.strategy_generator = torch.Generator().manual_seed(seed + 1)
        self.history: dict[str, list] = {"loss": [], "mask_updates": []}

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _check_split(self, split: Split, name: str) -> None:
        if not isinstance(split, Split):
            raise TypeError(f"{name} must be a fsmtl.data.Split, got {type(split).__name__}")
        if len(split.inputs) != len(self.tasks):
            raise ValueError(f"{name} has {len(split.inputs)} tasks but the trainer has {len(self.tasks)}")

    def fit(self, train: Split, *, epochs: int, batch_size: int, progress=None) -> dict[str, list]:
        """Train for ``epochs`` epochs; returns the history (per-epoch task losses, mask updates).

        Args:
            train: the training split.
            epochs: number of passes (an epoch is ``ceil(n / batch_size)`` steps; heterogeneous
                tasks cycle through their own shuffled data, the largest task setting ``n``).
            batch_size: examples per task per step.
            progress: an optional ``tqdm``-like object with ``update(n)``, advanced once per step.
        """
        self._check_split(train, "train")
        for name, value in (("epochs", epochs), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "epochs" else 1):
                raise ValueError(f"{name} must be a {'non-negative' if name == 'epochs' else 'positive'} int")
        sizes = [x.shape[0] for x in train.inputs]
        steps_per_epoch = -(-max(sizes) // batch_size)
        self.strategy.bind(TrainingContext(self.model, self.tasks, self._sampler(train), self.strategy_generator))
        self.model.train()
        step = 0
        for epoch in range(epochs):
            orders = self._epoch_orders(sizes, steps_per_epoch * batch_size)
            totals = torch.zeros(len(self.tasks))
            for i in range(steps_per_epoch):
                record = self.strategy.on_step(epoch, step, i == 0)
                if record is not None:
                    self.history["mask_updates"].append(record)
                idx = [o[i * batch_size : (i + 1) * batch_size] for o in orders]
                losses = self._losses(train, idx)
                self.optimizer.zero_grad(set_to_none=True)
                self.strategy.backward(losses)
                self.strategy.before_optimizer_step()
                self.optimizer.step()
                self.strategy.after_optimizer_step()
                totals += torch.stack([loss.detach().float().cpu() for loss in losses])
                step += 1
                if progress is not None:
                    progress.update(1)
            self.history["loss"].append((totals / steps_per_epoch).tolist())
        return self.history

    def _epoch_orders(self, sizes: list[int], length: int) -> list[torch.Tensor]:
        if self.homogeneous:
            order = torch.randperm(sizes[0], generator=self.generator)
            return [order] * len(sizes)
        orders = []
        for n in sizes:
            reps = -(-length // n)
            orders.append(torch.cat([torch.randperm(n, generator=self.generator) for _ in range(reps)])[:length])
        return orders

    def _losses(self, split: Split, idx: list[torch.Tensor]) -> list[torch.Tensor]:
        device = self.device
        targets = [y[i].to(device) for y, i in zip(split.targets, idx)]
        masks = [self.strategy.forward_mask(t) for t in range(len(self.tasks))]
        if self.homogeneous and all(m is None for m in masks):
            features = self.model.features(split.inputs[0][idx[0]].to(device))
            outputs = [head(features) for head in self.model.heads]
        else:
            outputs = [self.model(x[i].to(device), t, masks[t]) for t, (x, i) in enumerate(zip(split.inputs, idx))]
        return [task_loss(task, out, y) for task, out, y in zip(self.tasks, outputs, targets)]

    def _sampler(self, split: Split):
        def sample(task: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
            size = split.inputs[task].shape[0]
            idx = torch.randperm(size, generator=self.strategy_generator)[: min(n, size)]
            return split.inputs[task][idx].to(self.device), split.targets[task][idx].to(self.device)

        return sample

    @torch.no_grad()
    def predict(self, split: Split, *, batch_size: int = 1024) -> list[torch.Tensor]:
        """Outputs of each task's head on its inputs (task masks applied when the strategy masks
        the forward), on the CPU."""
        self._check_split(split, "split")
        was_training = self.model.training
        self.model.eval()
        try:
            outs = []
            for t, x in enumerate(split.inputs):
                mask = self.strategy.forward_mask(t)
                chunks = [
                    self.model(x[i : i + batch_size].to(self.device), t, mask).cpu()
                    for i in range(0, x.shape[0], batch_size)
                ]
                outs.append(torch.cat(chunks))
            return outs
        finally:
            self.model.train(was_training)

    def evaluate(self, split: Split, *, batch_size: int = 1024) -> list[dict[str, float]]:
        """Per-task metrics (:func:`fsmtl.metrics.task_metrics`) on ``split``."""
        from .metrics import task_metrics

        outputs = self.predict(split, batch_size=batch_size)
        return [task_metrics(task, out, y) for task, out, y in zip(self.tasks, outputs, split.targets)]
