"""The Trainer: a model, the task list and a strategy; the strategy owns every method decision.

The Trainer owns the loop around the strategy: data (in-memory ``Split``s or ``torch.utils.data``
datasets/loaders, :mod:`fsmtl.data.loaders`), checks at the boundary (:mod:`fsmtl.checks`),
validation, LR schedules, mixed precision, and everything a run depends on as state
(:meth:`Trainer.state_dict`), so that a run saved at any step and resumed trains bit for bit as
one that never stopped.
"""

from __future__ import annotations

import copy
import json
import random
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from . import checkpoint as ckpt
from . import distributed
from .checks import check_batch, check_inputs, check_outputs, check_targets
from .data import Split, Task
from .data.loaders import backing_split, homogeneous_batch, sampler, to_device, train_source
from .losses import task_loss
from .model import MultiTaskModel
from .strategies.base import Strategy, TrainingContext

AMP_DTYPES = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}
STATE_VERSION = 1


def _rng_states() -> dict:
    states = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


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
        seed: seeds the batch order (one generator) and the strategy's sampling (another).
        scheduler: an optional ``torch.optim.lr_scheduler`` over ``optimizer``.
        scheduler_interval: ``"epoch"`` (``scheduler.step()`` after each epoch) or ``"step"``.
        amp: None, ``"bf16"`` or ``"fp16"``: autocast of the forward (and losses) only; fp16 uses
            a ``GradScaler``. Fisher estimates and masks are always float32 on unscaled losses.
        skip_nonfinite: False raises ``FloatingPointError`` on a NaN/inf task loss; True skips that
            step (no update) and counts it in ``history["skipped_nonfinite"]``.
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
        scheduler=None,
        scheduler_interval: str = "epoch",
        amp: str | None = None,
        skip_nonfinite: bool = False,
    ) -> None:
        if not isinstance(model, MultiTaskModel):
            raise TypeError(f"model must be a MultiTaskModel, got {type(model).__name__}")
        if len(tasks) != model.num_tasks:
            raise ValueError(f"tasks has {len(tasks)} entries but the model has {model.num_tasks} heads")
        for t, task in enumerate(tasks):
            if not isinstance(task, Task):
                raise TypeError(f"tasks[{t}] must be a fsmtl.data.Task, got {type(task).__name__}")
        if not isinstance(strategy, Strategy):
            raise TypeError(f"strategy must be a Strategy, got {type(strategy).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if scheduler_interval not in ("epoch", "step"):
            raise ValueError(f"scheduler_interval must be 'epoch' or 'step', got {scheduler_interval!r}")
        if amp not in AMP_DTYPES:
            raise ValueError(f"amp must be one of {tuple(AMP_DTYPES)}, got {amp!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        self.model = model
        self.tasks = list(tasks)
        self.strategy = strategy
        self.optimizer = optimizer
        self.homogeneous = bool(homogeneous)
        self.scheduler = scheduler
        self.scheduler_interval = scheduler_interval
        self.amp = amp
        self.skip_nonfinite = bool(skip_nonfinite)
        device_type = self.device.type
        # A GradScaler only for fp16: bf16 has float32's exponent range, so its gradients do not underflow.
        self.scaler = torch.amp.GradScaler(device_type) if amp == "fp16" else None
        if self.scaler is not None and getattr(strategy, "in_turns", False):
            raise ValueError(
                "amp='fp16' (a gradient scaler) is not supported with a strategy that updates tasks in turns"
            )
        # Separate streams: the strategy's sampling must not shift the batch order, so that two
        # strategies with the same seed see the same batches.
        self.generator = torch.Generator().manual_seed(seed)
        self.strategy_generator = torch.Generator().manual_seed(seed + 1)
        self.epoch = 0  # index of the current epoch (== epochs completed when epoch_step == 0)
        self.epoch_step = 0  # steps done in the current epoch
        self.global_step = 0
        self._epoch_totals = torch.zeros(len(self.tasks), dtype=torch.float64)
        self._epoch_counted = 0
        self._epoch_start_rng: dict | None = None
        self._best_model: dict | None = None
        self._bound = False
        # In a process group of several ranks: data shares and the per-step collectives (fsmtl.distributed).
        self._sync = distributed.GradientSync() if distributed.world() is not None else None
        self.history: dict = {
            "loss": [],
            "mask_updates": [],
            "val": [],
            "best_epoch": None,
            "best_score": None,
            "skipped_nonfinite": 0,
            "skipped_amp": 0,
            "stopped_early": False,
        }

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ----------------------------------------------------------------------------------- checks

    def _check_split(self, split: Split, name: str) -> None:
        """An in-memory split: one input/target per task, non-empty, homogeneous inputs shared,
        targets of the right dtype, shape and range, no NaN (whole tensors, once per call)."""
        if len(split.inputs) != len(self.tasks):
            raise ValueError(f"{name} has {len(split.inputs)} tasks but the trainer has {len(self.tasks)}")
        if self.homogeneous:
            first = split.inputs[0]
            for task, x in zip(self.tasks[1:], split.inputs[1:]):
                if x is not first and (x.shape != first.shape or not torch.equal(x, first)):
                    raise ValueError(
                        f"{name}: homogeneous training shares one input tensor, but task {task.name!r} has "
                        "different inputs; pass homogeneous=False to train each task on its own inputs"
                    )
        for t, (task, x, y) in enumerate(zip(self.tasks, split.inputs, split.targets)):
            if self.homogeneous and t > 0 and x is split.inputs[0]:
                check_targets(task, y, x.shape[0], name)
                continue
            if x.shape[0] == 0:
                raise ValueError(f"{name}: task {task.name!r} has no samples (empty data)")
            check_inputs(task, x, name)
            check_targets(task, y, x.shape[0], name)

    @staticmethod
    def _check_count(value, name: str, minimum: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")

    # ------------------------------------------------------------------------------------ state

    def _bind(self, fisher_data) -> None:
        sample = (
            sampler(fisher_data, self.tasks, self.homogeneous, self.strategy_generator, self.device, "fisher_data")
            if fisher_data is not None
            else _no_data
        )
        if self._sync is not None and fisher_data is not None:
            sample = self._sync.shard_sampler(sample)  # each rank scores its share of the N samples
        self.strategy.bind(TrainingContext(self.model, self.tasks, sample, self.strategy_generator))
        self._bound = True

    def state_dict(self) -> dict:
        """Everything the next step depends on (model, optimizer, scheduler, grad scaler, strategy,
        every RNG stream, counters, history), as tensors and plain Python objects for ``torch.save``."""
        return {
            "version": STATE_VERSION,
            "model": copy.deepcopy(self.model.state_dict()),
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "strategy": self.strategy.state_dict(),
            "rng": {
                "data": self.generator.get_state(),
                "strategy": self.strategy_generator.get_state(),
                "global": _rng_states(),
                "epoch_start": copy.deepcopy(self._epoch_start_rng),
            },
            "counters": {
                "epoch": self.epoch,
                "epoch_step": self.epoch_step,
                "global_step": self.global_step,
                "epoch_totals": self._epoch_totals.clone(),
                "epoch_counted": self._epoch_counted,
            },
            "history": copy.deepcopy(self.history),
            "best_model": copy.deepcopy(self._best_model),
            "amp": self.amp,
            "tasks": [t.name for t in self.tasks],
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict`; the next ``fit`` continues where that one stopped."""
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ValueError("not a fsmtl Trainer state (wrong or missing version)")
        if state["tasks"] != [t.name for t in self.tasks]:
            names = [t.name for t in self.tasks]
            raise ValueError(f"the state is for tasks {state['tasks']}, this trainer has {names}")
        if state["amp"] != self.amp:
            raise ValueError(f"the state was trained with amp={state['amp']!r}, this trainer has amp={self.amp!r}")
        for name in ("scheduler", "scaler"):
            if (state[name] is None) != (getattr(self, name) is None):
                raise ValueError(f"the state {'has' if state[name] is not None else 'has no'} {name}, this trainer not")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None:
            self.scaler.load_state_dict(state["scaler"])
        if not self._bound:
            self._bind(None)
        self.strategy.load_state_dict(state["strategy"])
        rng = state["rng"]
        self.generator.set_state(rng["data"])
        self.strategy_generator.set_state(rng["strategy"])
        _set_rng_states(rng["global"])
        self._epoch_start_rng = copy.deepcopy(rng["epoch_start"])
        c = state["counters"]
        self.epoch, self.epoch_step, self.global_step = c["epoch"], c["epoch_step"], c["global_step"]
        self._epoch_totals = c["epoch_totals"].clone()
        self._epoch_counted = c["epoch_counted"]
        self.history = copy.deepcopy(state["history"])
        self._best_model = copy.deepcopy(state["best_model"])

    def save_checkpoint(self, directory, *, keep_last: int = 3) -> Path:
        """Write :meth:`state_dict` atomically as ``directory/ckpt-<global step>.pt``."""
        return ckpt.save_checkpoint(self.state_dict(), directory, self.global_step, keep_last=keep_last)

    def resume(self, directory) -> bool:
        """Load the newest checkpoint of ``directory``; False when there is none."""
        state = ckpt.load_latest(directory, map_location="cpu")
        if state is None:
            return False
        self.load_state_dict(state)
        return True

    # ------------------------------------------------------------------------------------ fit

    def fit(
        self,
        train,
        *,
        epochs: int,
        batch_size: int | None = None,
        val=None,
        eval_every: int = 1,
        log_path=None,
        restore_best: bool = False,
        patience: int | None = None,
        fisher_data=None,
        num_workers: int = 0,
        checkpoint_dir=None,
        checkpoint_every: int | None = None,
        checkpoint_unit: str = "epoch",
        keep_last: int = 3,
        progress=None,
    ) -> dict:
        """Train for ``epochs`` more epochs (an epoch interrupted by a checkpoint counts as one);
        returns the history.

        Calling ``fit`` again continues the epoch and step counters, so ``fit(epochs=3)`` twice
        trains exactly as ``fit(epochs=6)``.

        Args:
            train: a ``Split``, or ``torch.utils.data`` data (see :mod:`fsmtl.data.loaders`).
            epochs: number of epochs (a ``Split`` epoch is ``ceil(n / batch_size)`` steps,
                heterogeneous tasks cycling through their own shuffled data, the largest setting ``n``).
            batch_size: examples per task per step (for a ``Split`` or datasets; loaders keep theirs).
            val: optional validation data (same forms as ``train``): per-task metrics every
                ``eval_every`` epochs into ``history["val"]`` (and ``log_path`` as JSON lines);
                the best epoch by the mean of the tasks' primary metrics is kept.
            restore_best: load the best epoch's weights at the end (needs ``val``).
            patience: stop after this many evaluations without a better score (needs ``val``).
            fisher_data: where mask updates draw their examples (default: ``train``).
            num_workers: DataLoader workers for datasets.
            checkpoint_dir: write checkpoints here every ``checkpoint_every`` ``checkpoint_unit``
                (``"epoch"`` or ``"step"``), keeping the newest ``keep_last``; also on a stop request.
            progress: an optional ``tqdm``-like object with ``update(n)``, advanced once per step.
        """
        self._check_count(epochs, "epochs", 0)
        self._check_count(eval_every, "eval_every", 1)
        if patience is not None:
            self._check_count(patience, "patience", 1)
        if (restore_best or patience is not None) and val is None:
            raise ValueError("restore_best and patience need validation data (val=...)")
        if checkpoint_unit not in ("epoch", "step"):
            raise ValueError(f"checkpoint_unit must be 'epoch' or 'step', got {checkpoint_unit!r}")
        if checkpoint_every is not None:
            self._check_count(checkpoint_every, "checkpoint_every", 1)
            if checkpoint_dir is None:
                raise ValueError("checkpoint_every needs checkpoint_dir")
        on_cuda = self.device.type == "cuda"
        global_batch = batch_size if self._sync is None else self._sync.global_batch_size(batch_size, train)
        source = train_source(
            train, self.tasks, self.homogeneous, global_batch, self.generator,
            num_workers=num_workers, pin_memory=on_cuda,
        )  # fmt: skip
        if self._sync is not None:
            source = self._sync.shard_source(source)  # this rank's share of every global batch
        in_memory = isinstance(train, Split) or backing_split(train) is not None
        if in_memory:
            # Checked whole, once: its batches then need no per-batch value checks.
            self._check_split(train if isinstance(train, Split) else backing_split(train), "train")
        for name, data in (("val", val), ("fisher_data", fisher_data)):
            if isinstance(data, Split):
                self._check_split(data, name)
            elif data is not None:
                train_source(data, self.tasks, self.homogeneous, batch_size or 1, None, where=name)
        steps = source.steps_per_epoch
        self._bind(fisher_data if fisher_data is not None else train)
        end_epoch = self.epoch + epochs
        self.strategy.on_fit_start(range(self.epoch, end_epoch), steps)
        self.model.train()
        first_batch = True
        while self.epoch < end_epoch and not self.history["stopped_early"]:
            batches = self._epoch_batches(source)
            for inputs, targets in batches:
                if first_batch or not in_memory:
                    # In-memory data was checked whole above; other batches are checked on the CPU
                    # (values only there, so the check never waits for the device).
                    values = all(x.device.type == "cpu" for x in inputs) or first_batch
                    check_batch(self.tasks, inputs, targets, f"train epoch {self.epoch} step {self.epoch_step}",
                                values=values)  # fmt: skip
                self._train_step(inputs, targets, probe=first_batch)
                first_batch = False
                if progress is not None:
                    progress.update(1)
                last = steps is not None and self.epoch_step == steps
                if last:
                    break
                self._after_step(checkpoint_dir, checkpoint_every, checkpoint_unit, keep_last, epoch_end=False)
            self._end_epoch(val, eval_every, log_path, restore_best, patience, batch_size)
            self._after_step(checkpoint_dir, checkpoint_every, checkpoint_unit, keep_last, epoch_end=True)
        if restore_best and self._best_model is not None:
            self.model.load_state_dict(self._best_model)
        if self._sync is not None:
            self.history["distributed"] = self._sync.info()
        return self.history

    def _epoch_batches(self, source):
        """The current epoch's batches; a resumed epoch replays its start and skips the steps done."""
        if self.epoch_step == 0:
            self._epoch_start_rng = {"data": self.generator.get_state(), "global": _rng_states()}
            return iter(source.epoch())
        now = {"data": self.generator.get_state(), "global": _rng_states()}
        self.generator.set_state(self._epoch_start_rng["data"])
        _set_rng_states(self._epoch_start_rng["global"])
        batches = iter(source.epoch())
        for _ in range(self.epoch_step):
            next(batches)
        self.generator.set_state(now["data"])
        _set_rng_states(now["global"])
        return batches

    def _after_step(self, directory, every, unit, keep_last, *, epoch_end: bool) -> None:
        """Write a due checkpoint; on a stop request (SIGINT/SIGTERM) write one and raise
        :class:`~fsmtl.checkpoint.TrainingInterrupted`."""
        stop = ckpt.STOP.is_set() if self._sync is None else self._sync.stop  # all ranks agree on a stop
        due = False
        if directory is not None and every is not None:
            count = self.epoch if unit == "epoch" else self.global_step
            due = (unit == "step" or epoch_end) and count % every == 0
        if directory is not None and (due or stop) and distributed.is_main_process():
            self.save_checkpoint(directory, keep_last=keep_last)
        if stop:
            raise ckpt.TrainingInterrupted(f"stopped at epoch {self.epoch}, step {self.global_step}")

    def _train_step(self, inputs, targets, *, probe: bool) -> None:
        device = self.device
        if self.homogeneous:
            inputs = [to_device(inputs[0], device)] * len(inputs)  # one transfer, the same tensor for every head
        else:
            inputs = [to_device(x, device) for x in inputs]
        targets = [to_device(y, device) for y in targets]
        if probe:
            self._probe(inputs, targets)
        record = self.strategy.on_step(self.epoch, self.global_step, self.epoch_step == 0)
        if record is not None:
            self.history["mask_updates"].append(record)
        streamed = self._open_stream()
        try:
            losses = self._losses(inputs, targets, streamed)
            # The step's only device sync: the loss values, checked before anything is updated
            # (a streamed step's gradients are still private to its stream until finish()).
            values = torch.stack([loss.detach() for loss in losses]).cpu()
            if self._sync is not None:
                values = self._sync.reduce_losses(values, ckpt.STOP.is_set())  # the global batch's losses
            finite = torch.isfinite(values)
            ok = bool(finite.all())
            if not ok and not self.skip_nonfinite:
                task = self.tasks[int((~finite).nonzero()[0])]
                raise FloatingPointError(
                    f"non-finite loss {float(values[self.tasks.index(task)])} of task {task.name!r} at epoch "
                    f"{self.epoch}, step {self.global_step} (epoch step {self.epoch_step}); nothing was updated "
                    "(skip_nonfinite=True skips such steps)"
                )
            if streamed is not None and ok:
                streamed.finish()
            elif streamed is not None:
                streamed.abandon()  # a skipped step writes no .grad
        except BaseException:
            if streamed is not None:
                streamed.abandon()
            raise
        if not ok:
            self.history["skipped_nonfinite"] += 1
        else:
            if streamed is None:
                self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                # The masked average is linear in the losses: scaling each loss scales the combined
                # gradient, which is unscaled once, before the strategy's pre-step hook.
                if streamed is None:
                    self.strategy.backward([self.scaler.scale(loss) for loss in losses])
                self._all_reduce_grads()
                self.scaler.unscale_(self.optimizer)
                self.strategy.before_optimizer_step()
                scale = self.scaler.get_scale()
                self.scaler.step(self.optimizer)
                self.scaler.update()
                if self.scaler.get_scale() < scale:
                    self.history["skipped_amp"] += 1
            elif getattr(self.strategy, "in_turns", False):
                self._step_in_turns(inputs, targets, losses)
            else:
                if streamed is None:
                    self.strategy.backward(losses)
                self._all_reduce_grads()
                self.strategy.before_optimizer_step()
                self.optimizer.step()
            self.strategy.after_optimizer_step()
            if self.scheduler is not None and self.scheduler_interval == "step":
                self.scheduler.step()
            self._epoch_totals += values.double()
            self._epoch_counted += 1
        self.epoch_step += 1
        self.global_step += 1

    def _step_in_turns(self, inputs, targets, losses) -> None:
        """The tasks' updates in turns (a strategy with ``in_turns``): task t's loss on the parameters
        the updates of tasks 0..t-1 left, its gradient from ``strategy.backward_task``, one optimizer
        step per task (task 0 uses the step's loss, computed before any update)."""
        for t, task in enumerate(self.tasks):
            if t > 0:
                loss = task_loss(task, self.model(inputs[t], t, self.strategy.forward_mask(t)), targets[t]).float()
            else:
                loss = losses[0]
            self.optimizer.zero_grad(set_to_none=True)
            self.strategy.backward_task(t, loss)
            self._all_reduce_grads()
            self.strategy.before_optimizer_step()
            self.optimizer.step()
            if t < len(self.tasks) - 1:
                self.strategy.after_optimizer_step()

    def _open_stream(self) -> _StreamedBackward | None:
        """A streamed step when the tasks run separate trunk forwards (forward masks, heterogeneous
        inputs) and the strategy can take their losses one task at a time
        (``streams_backward()``, e.g. a :class:`~fsmtl.strategies.SparseStrategy` with a mask):
        each task's backward then runs right after its forward, one task graph alive at a time."""
        if getattr(self.strategy, "in_turns", False) or self._shared_forward():
            return None
        if not self.strategy.streams_backward():
            return None
        return _StreamedBackward(self.model, self.optimizer, self.strategy.open_backward_stream)

    def _losses(self, inputs, targets, streamed: _StreamedBackward | None) -> list[torch.Tensor]:
        """The T task losses (float32), under autocast when ``amp`` is set. Streamed: task t's
        forward, its loss and its backward (the loss scaled by the grad scaler, outside autocast)
        before task t + 1's forward; the losses come back detached."""
        amp = AMP_DTYPES[self.amp]
        device_type = self.device.type

        def autocast():
            return torch.autocast(device_type, dtype=amp) if amp is not None else nullcontext()

        if streamed is None:
            with autocast():
                outputs = self._outputs(inputs)
                losses = [task_loss(task, out, y) for task, out, y in zip(self.tasks, outputs, targets)]
            return [loss.float() for loss in losses]
        losses = []
        with self.model.streamed_forwards():
            for t, (task, x, y) in enumerate(zip(self.tasks, inputs, targets)):
                with autocast():
                    loss = task_loss(task, self.model(x, t, self.strategy.forward_mask(t)), y)
                loss = loss.float()
                streamed.backward(t, loss if self.scaler is None else self.scaler.scale(loss))
                losses.append(loss.detach())
        return losses

    def _all_reduce_grads(self) -> None:
        """Several ranks: one all-reduce of the combined gradients (shared + heads), weighted by each
        rank's share of the global batch."""
        if self._sync is not None:
            self._sync.all_reduce_grads(list(self.model.parameters()))

    def _probe(self, inputs, targets) -> None:
        """Check each head's output shape on two samples, in eval mode without grad (so no
        BatchNorm statistic, parameter or RNG changes) before the first update."""
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                outputs = self._outputs([x[:2] for x in inputs])
            for task, out, y in zip(self.tasks, outputs, targets):
                check_outputs(task, out, y[:2], "model")
        finally:
            self.model.train(was_training)

    def _shared_forward(self) -> bool:
        """One trunk forward feeds every head: shared inputs, no forward masks, no modulation."""
        if not self.homogeneous or self.strategy.modulates_forward:
            return False
        return all(self.strategy.forward_mask(t) is None for t in range(len(self.tasks)))

    def _outputs(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        if self._shared_forward():
            features = self.model.features(inputs[0])
            return [head(features) for head in self.model.heads]
        return [self.model(x, t, self.strategy.forward_mask(t)) for t, x in enumerate(inputs)]

    def _end_epoch(self, val, eval_every, log_path, restore_best, patience, batch_size) -> None:
        mean = self._epoch_totals / max(self._epoch_counted, 1)
        self.history["loss"].append(mean.float().tolist())
        if self.scheduler is not None and self.scheduler_interval == "epoch":
            self.scheduler.step()
        epoch = self.epoch
        self.epoch += 1
        self.epoch_step = 0
        self._epoch_totals = torch.zeros(len(self.tasks), dtype=torch.float64)
        self._epoch_counted = 0
        if val is None or self.epoch % eval_every != 0:
            return
        metrics = self.evaluate(val, batch_size=max(batch_size or 0, 1024))
        score = primary_score(self.tasks, metrics)
        entry = {"epoch": epoch, "step": self.global_step, "loss": self.history["loss"][-1], "metrics": metrics}
        entry["score"] = score
        self.history["val"].append(entry)
        if log_path is not None and distributed.is_main_process():  # several ranks: rank 0 writes the log
            with open(log_path, "a") as f:
                f.write(json.dumps(entry) + "\n")
        if self.history["best_score"] is None or score > self.history["best_score"]:
            self.history["best_score"], self.history["best_epoch"] = score, epoch
            if restore_best:
                self._best_model = copy.deepcopy(self.model.state_dict())
        elif patience is not None:
            since = sum(1 for e in self.history["val"] if e["epoch"] > self.history["best_epoch"])
            if since >= patience:
                self.history["stopped_early"] = True

    # ------------------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def _predict_with_targets(self, data, batch_size: int, name: str):
        if isinstance(data, Split):
            self._check_split(data, name)
        was_training = self.model.training
        self.model.eval()
        device = self.device
        amp = AMP_DTYPES[self.amp]
        try:
            with torch.autocast(device.type, dtype=amp) if amp is not None else nullcontext():
                if isinstance(data, Split):
                    x = data.inputs[0]
                    if self.homogeneous and all(xt is x for xt in data.inputs):  # one trunk pass when it can
                        parts = [
                            self._outputs([to_device(x[i : i + batch_size], device)] * len(self.tasks))
                            for i in range(0, x.shape[0], batch_size)
                        ]
                        return [torch.cat([p[t].float().cpu() for p in parts]) for t in range(len(self.tasks))], list(
                            data.targets
                        )
                    outs = []
                    for t, x in enumerate(data.inputs):
                        mask = self.strategy.forward_mask(t)
                        chunks = [
                            self.model(to_device(x[i : i + batch_size], device), t, mask).float().cpu()
                            for i in range(0, x.shape[0], batch_size)
                        ]
                        outs.append(torch.cat(chunks))
                    return outs, list(data.targets)
                # Evaluation: one pass over each loader in its own order, no cycling.
                source = train_source(data, self.tasks, self.homogeneous, batch_size, None, where=name)
                outs = [[] for _ in self.tasks]
                ys = [[] for _ in self.tasks]
                loaders = [source.loaders] if self.homogeneous else source.loaders
                for t_or_all, loader in enumerate(loaders):
                    for batch in loader:
                        if self.homogeneous:
                            x, targets = homogeneous_batch(batch, self.tasks, name)
                            check_batch(self.tasks, [x] * len(self.tasks), targets, name)
                            x = to_device(x, device)
                            for t in range(len(self.tasks)):
                                outs[t].append(self.model(x, t, self.strategy.forward_mask(t)).float().cpu())
                                ys[t].append(targets[t])
                        else:
                            x, y = batch[0], batch[1]
                            check_batch([self.tasks[t_or_all]], [x], [y], name)
                            mask = self.strategy.forward_mask(t_or_all)
                            outs[t_or_all].append(self.model(to_device(x, device), t_or_all, mask).float().cpu())
                            ys[t_or_all].append(y)
                return [torch.cat(o) for o in outs], [torch.cat(y) for y in ys]
        finally:
            self.model.train(was_training)

    def predict(self, data, *, batch_size: int = 1024) -> list[torch.Tensor]:
        """Outputs of each task's head on its inputs (task masks applied when the strategy masks
        the forward), float32 on the CPU. ``data``: a ``Split`` or datasets/loaders as for ``fit``
        (their order is kept)."""
        return self._predict_with_targets(data, batch_size, "data")[0]

    def evaluate(self, data, *, batch_size: int = 1024) -> list[dict[str, float]]:
        """Per-task metrics (:func:`fsmtl.metrics.task_metrics`) on ``data``."""
        from .metrics import task_metrics

        outputs, targets = self._predict_with_targets(data, batch_size, "data")
        return [task_metrics(task, out, y) for task, out, y in zip(self.tasks, outputs, targets)]


class _StreamedBackward:
    """The Trainer's side of a streamed step: the strategy's stream (``open_backward_stream``),
    opened on ``.grad`` set to None, with the ``.grad`` tensors it replaced kept aside until the
    step's losses are known to be finite: :meth:`finish` writes the step's ``.grad``,
    :meth:`abandon` (a non-finite loss, an error) closes the stream without writing and puts the
    old ``.grad`` back, so an abandoned step changes no gradient."""

    def __init__(self, model: MultiTaskModel, optimizer: torch.optim.Optimizer, open_stream) -> None:
        params = {id(p): p for group in optimizer.param_groups for p in group["params"]}
        params.update((id(p), p) for p in model.parameters())
        self.model = model
        self.saved = [(p, p.grad) for p in params.values()]
        optimizer.zero_grad(set_to_none=True)  # before the forwards: the stream takes .grad over
        try:
            self.stream = open_stream()
        except BaseException:
            self._restore()
            raise
        self.done = False

    def backward(self, task: int, loss: torch.Tensor) -> None:
        self.stream.backward(task, loss)

    def finish(self) -> None:
        self.stream.finish()
        self.done = True
        self.saved = []
        self.model.pop_forward_record()  # the stream took every task's graph

    def abandon(self) -> None:
        if self.done:
            return
        self.done = True
        self.stream.close()
        self._restore()
        self.model.pop_forward_record()

    def _restore(self) -> None:
        for p, grad in self.saved:
            p.grad = grad
        self.saved = []


def primary_score(tasks: Sequence[Task], metrics: Sequence[dict[str, float]]) -> float:
    """Mean over tasks of each task kind's primary metric, signed so that higher is better."""
    from .tasks import METRIC_DIRECTION, task_kind

    scores = []
    for task, m in zip(tasks, metrics):
        name = task_kind(task.kind).primary_metric
        scores.append(m[name] if METRIC_DIRECTION[name] else -m[name])
    return sum(scores) / len(scores)


def _no_data(task: int, n: int):
    raise RuntimeError("this strategy needs training data to sample from; call Trainer.fit")
