"""The step modes of the Trainer, one class each: a plain step (the T losses at once, one
backward through the strategy), a streamed step (each task's backward right after its own
forward), a step in turns (one optimizer update per task), and the gradient scaling of fp16 that
the first two share. The Trainer picks the mode per step and drives it:
``losses = step.forward(...)``, the loss check, then ``step.backward(losses)`` and
``step.update(...)``, or ``step.discard()`` when the step is skipped or fails."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from ..gradients import ForwardRecord
from ..model import MultiTaskModel
from ..tasks.losses import task_loss

AMP_DTYPES = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}


def shared_forward(model: MultiTaskModel, strategy, homogeneous: bool, num_tasks: int) -> bool:
    """One trunk forward feeds every head: shared inputs, no forward masks, no modulation."""
    if not homogeneous or strategy.modulates_forward:
        return False
    return all(strategy.forward_mask(t) is None for t in range(num_tasks))


def task_outputs(trainer, inputs: list[torch.Tensor], record: ForwardRecord | None = None) -> list[torch.Tensor]:
    """Each task's head outputs on its inputs: one trunk forward when :func:`shared_forward`,
    else one forward per task under the strategy's forward mask."""
    model, strategy = trainer.model, trainer.strategy
    if shared_forward(model, strategy, trainer.homogeneous, len(trainer.tasks)):
        features = model.features(inputs[0], record=record)
        return [head(features) for head in model.heads]
    return [model(x, t, strategy.forward_mask(t), record=record) for t, x in enumerate(inputs)]


def autocast(trainer):
    """Autocast of the forward (and losses) when the trainer has ``amp`` set."""
    amp = AMP_DTYPES[trainer.amp]
    return torch.autocast(trainer.device.type, dtype=amp) if amp is not None else nullcontext()


def all_reduce_grads(trainer) -> None:
    """Several ranks: one all-reduce of the combined gradients (shared + heads), weighted by each
    rank's share of the global batch."""
    if trainer.gradient_sync is not None and trainer.parallel != "fsdp":  # FSDP reduce-scatters in backward
        trainer.gradient_sync.all_reduce_grads(list(trainer.model.parameters()))


class Scaling:
    """The optimizer step after the gradients are written, with fp16's ``GradScaler`` when the
    trainer has one: the masked average is linear in the losses, so scaling each loss scales the
    combined gradient, which is unscaled once, before the strategy's pre-step hook."""

    def __init__(self, trainer) -> None:
        self.trainer = trainer
        self.scaler = trainer.scaler

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return loss if self.scaler is None else self.scaler.scale(loss)

    def step(self) -> None:
        """All-reduce (several ranks), the strategy's pre-step hook and ``optimizer.step()``."""
        t = self.trainer
        all_reduce_grads(t)
        if self.scaler is None:
            t.strategy.before_optimizer_step()
            t.optimizer.step()
            return
        self.scaler.unscale_(t.optimizer)
        t.strategy.before_optimizer_step()
        scale = self.scaler.get_scale()
        self.scaler.step(t.optimizer)
        self.scaler.update()
        if self.scaler.get_scale() < scale:
            t.history["skipped_amp"] += 1


class PlainStep:
    """The T losses from the step's forwards (one trunk forward when the tasks share it), then one
    :meth:`Strategy.backward` of all of them and one optimizer step."""

    def __init__(self, trainer) -> None:
        self.trainer = trainer
        self.scaling = Scaling(trainer)
        self.record = trainer.strategy.forward_record()

    def forward(self, inputs, targets) -> list[torch.Tensor]:
        """The T task losses (float32), under autocast when ``amp`` is set."""
        with autocast(self.trainer):
            outputs = task_outputs(self.trainer, inputs, self.record)
            losses = [task_loss(task, out, y) for task, out, y in zip(self.trainer.tasks, outputs, targets)]
        return [loss.float() for loss in losses]

    def backward(self, losses: list[torch.Tensor]) -> None:
        self.trainer.optimizer.zero_grad(set_to_none=True)
        self.trainer.strategy.backward([self.scaling.scale(loss) for loss in losses], self.record)
        self.record = None  # the record holds part of the graph: free it with the backward

    def update(self, inputs, targets, losses) -> None:
        self.scaling.step()

    def discard(self) -> None:
        self.record = None


class InTurnsStep(PlainStep):
    """The tasks' updates in turns (a strategy with ``in_turns``): task t's loss on the parameters
    the updates of tasks 0..t-1 left, its gradient from ``strategy.backward_task``, one optimizer
    step per task (task 0 uses the step's loss, computed before any update)."""

    def __init__(self, trainer) -> None:
        super().__init__(trainer)
        self.record = None  # backward_task takes no record of the forwards

    def backward(self, losses: list[torch.Tensor]) -> None:
        self.trainer.optimizer.zero_grad(set_to_none=True)
        self.record = None

    def update(self, inputs, targets, losses) -> None:
        t_, strategy = self.trainer, self.trainer.strategy
        for t, task in enumerate(t_.tasks):
            if t > 0:
                with autocast(t_):  # the same precision as task 0's loss from the step's forward
                    loss = task_loss(task, t_.model(inputs[t], t, strategy.forward_mask(t)), targets[t])
                loss = loss.float()
            else:
                loss = losses[0]
            t_.optimizer.zero_grad(set_to_none=True)
            strategy.backward_task(t, loss)
            all_reduce_grads(t_)
            strategy.before_optimizer_step()
            t_.optimizer.step()
            if t < len(t_.tasks) - 1:
                strategy.after_optimizer_step()


class StreamedStep:
    """Separate trunk forwards (forward masks, heterogeneous inputs) whose strategy takes their
    losses one task at a time (``streams_backward()``): task t's forward, its loss and its backward
    (the loss scaled by the grad scaler, outside autocast) before task t + 1's forward, so one task
    graph is alive at a time.

    The stream is opened on ``.grad`` set to None; the ``.grad`` tensors it replaced are kept aside
    until the step's losses are known to be finite: :meth:`backward` writes the step's ``.grad``,
    :meth:`discard` (a non-finite loss, an error) closes the stream without writing and puts the
    old ``.grad`` back, so an abandoned step changes no gradient."""

    def __init__(self, trainer) -> None:
        self.trainer = trainer
        self.scaling = Scaling(trainer)
        model, optimizer = trainer.model, trainer.optimizer
        params = {id(p): p for group in optimizer.param_groups for p in group["params"]}
        params.update((id(p), p) for p in model.parameters())
        self.saved = [(p, p.grad) for p in params.values()]
        optimizer.zero_grad(set_to_none=True)  # before the forwards: the stream takes .grad over
        try:
            self.stream = trainer.strategy.open_backward_stream()
        except BaseException:
            self._restore()
            raise
        self.done = False

    def forward(self, inputs, targets) -> list[torch.Tensor]:
        """Each task's forward and backward in turn; the losses come back detached."""
        t_ = self.trainer
        losses = []
        with t_.model.streamed_forwards():
            for t, (task, x, y) in enumerate(zip(t_.tasks, inputs, targets)):
                with autocast(t_):
                    loss = task_loss(task, t_.model(x, t, t_.strategy.forward_mask(t)), y)
                loss = loss.float()
                self.stream.backward(t, self.scaling.scale(loss))
                losses.append(loss.detach())
        return losses

    def backward(self, losses: list[torch.Tensor]) -> None:
        self.stream.finish()
        self.done = True
        self.saved = []

    def update(self, inputs, targets, losses) -> None:
        self.scaling.step()

    def discard(self) -> None:
        if self.done:
            return
        self.done = True
        self.stream.close()
        self._restore()

    def _restore(self) -> None:
        for p, grad in self.saved:
            p.grad = grad
        self.saved = []


def step_mode(trainer):
    """The step mode of the trainer's next step (see the module docstring)."""
    strategy = trainer.strategy
    if strategy.in_turns:
        return InTurnsStep(trainer)
    if shared_forward(trainer.model, strategy, trainer.homogeneous, len(trainer.tasks)):
        return PlainStep(trainer)
    if strategy.streams_backward():
        return StreamedStep(trainer)
    return PlainStep(trainer)
