"""The Trainer: a model, the task list and a strategy; the strategy owns every method decision.

The Trainer owns the loop around the strategy: data (in-memory ``Split``s or ``torch.utils.data``
datasets/loaders, :mod:`fsmtl.engine.sources`), checks at the boundary (:mod:`fsmtl.tasks.checks`),
the step modes (:mod:`fsmtl.engine.steps`), validation (:mod:`fsmtl.engine.evaluation`), LR
schedules, mixed precision, and everything a run depends on as state (:mod:`fsmtl.engine.state`),
so that a run saved at any step and resumed trains bit for bit as one that never stopped.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.optim.lr_scheduler import ReduceLROnPlateau

from .. import collectives
from ..data import Split, backing_split
from ..data.batches import sampler, to_device
from ..model import MultiTaskModel
from ..strategies.base import Strategy, TrainingContext
from ..tasks import Task
from ..tasks.checks import check_batch, check_outputs
from ..tasks.metrics import primary_score
from . import checkpoint as ckpt
from . import distributed, sharded_checkpoint
from .evaluation import evaluate, predict
from .fingerprint import trainer_fingerprint
from .fit_checks import check_fit
from .fit_log import FitLog, FitProgress
from .sources import check_split, train_source
from .state import epoch_batches, restore_trainer_state, trainer_state
from .steps import AMP_DTYPES, step_mode, task_outputs


class Trainer:
    """Trains a :class:`~fsmtl.MultiTaskModel` with a :class:`~fsmtl.strategies.Strategy`.

    Args:
        model: trunk + one head per task.
        tasks: the T tasks, in head order.
        strategy: decides masks and how per-task gradients become the update.
        optimizer: over ``model.parameters()``.
        homogeneous: True when all tasks share inputs (one batch feeds T heads); False when
            each task has its own data (each step draws one batch per task, Algorithm 1 of the
            paper's appendix).
        seed: seeds the batch order (one generator) and the strategy's sampling (another).
        scheduler: an optional ``torch.optim.lr_scheduler`` over ``optimizer``. A
            ``ReduceLROnPlateau`` steps after each validation of ``fit(val=...)`` on the
            validation loss (minus the mean of the tasks' primary metrics, so "min" mode), and
            ``fit`` without ``val`` refuses it.
        scheduler_interval: ``"epoch"`` (``scheduler.step()`` after each epoch) or ``"step"``
            (not for ``ReduceLROnPlateau``, which needs a validation).
        amp: None, ``"bf16"`` or ``"fp16"``: autocast of the forward (and losses) only; fp16 uses
            a ``GradScaler``. Fisher estimates and masks are always float32 on unscaled losses.
        skip_nonfinite: False raises ``FloatingPointError`` on a NaN/inf task loss; True skips that
            step (no update) and counts it in ``history["skipped_nonfinite"]``.
        parallel: ``None`` (one process, or data parallel with one all-reduce of the combined
            gradient per step when a process group is initialized) or ``"fsdp"``: the model was
            sharded with FSDP2 (:meth:`fsmtl.MultiTaskModel.shard`, before the optimizer was built);
            every rank scores the same Fisher samples on a gathered full copy (the masks are the
            one-process masks), and each step reduce-scatters once per FSDP group. Homogeneous
            tasks only; mixed precision through the shard's ``mp_policy`` instead of ``amp``.
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
        parallel: str | None = None,
    ) -> None:
        if not isinstance(model, MultiTaskModel):
            raise TypeError(f"model must be a MultiTaskModel, got {type(model).__name__}")
        if len(tasks) != model.num_tasks:
            raise ValueError(f"tasks has {len(tasks)} entries but the model has {model.num_tasks} heads")
        for t, task in enumerate(tasks):
            if not isinstance(task, Task):
                raise TypeError(f"tasks[{t}] must be a fsmtl.Task, got {type(task).__name__}")
        if not isinstance(strategy, Strategy):
            raise TypeError(f"strategy must be a Strategy, got {type(strategy).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if scheduler_interval not in ("epoch", "step"):
            raise ValueError(f"scheduler_interval must be 'epoch' or 'step', got {scheduler_interval!r}")
        if isinstance(scheduler, ReduceLROnPlateau) and scheduler_interval != "epoch":
            raise ValueError("a ReduceLROnPlateau scheduler steps on validations: scheduler_interval must be 'epoch'")
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
        if parallel not in (None, "fsdp"):
            raise ValueError(f"parallel must be None or 'fsdp', got {parallel!r}")
        self.parallel = parallel
        if parallel == "fsdp":
            _check_sharded(model, optimizer, strategy, homogeneous, amp)
        device_type = self.device.type
        # A GradScaler only for fp16: bf16 has float32's exponent range, so its gradients do not underflow.
        self.scaler = torch.amp.GradScaler(device_type) if amp == "fp16" else None
        if self.scaler is not None and strategy.in_turns:
            raise ValueError(
                "amp='fp16' (a gradient scaler) is not supported with a strategy that updates tasks in turns "
                "(FisherSparse: update='average'; or amp='bf16', which needs no scaler)"
            )
        # Separate streams: the strategy's sampling must not shift the batch order, so that two
        # strategies with the same seed see the same batches.
        self.generator = torch.Generator().manual_seed(seed)
        self.strategy_generator = torch.Generator().manual_seed(seed + 1)
        self.epoch = 0  # index of the current epoch (== epochs completed when epoch_step == 0)
        self.epoch_step = 0  # steps done in the current epoch
        self.global_step = 0
        #: The current epoch's summed task losses and counted steps (its mean goes to history["loss"]).
        self.epoch_totals = torch.zeros(len(self.tasks), dtype=torch.float64)
        self.epoch_counted = 0
        #: The data generator and global RNG states at the current epoch's start (to replay it on resume).
        self.epoch_start_rng: dict | None = None
        #: The best validation epoch's model weights (``restore_best``).
        self.best_model: dict | None = None
        self.strategy_bound = False
        self._progress = None  # fit's progress display, while fit runs
        self._log: FitLog | None = None  # fit's records, while fit runs
        #: In a process group of several ranks: data shares and the per-step collectives
        #: (:class:`fsmtl.engine.distributed.GradientSync`); None in a single process.
        self.gradient_sync = distributed.GradientSync() if collectives.world() is not None else None
        #: The global batch of the current fit (checkpointed: a mid-epoch resume needs the same one).
        self.global_batch: int | None = None
        #: What decides this run's results (:mod:`fsmtl.engine.fingerprint`): a state of another run is refused.
        self.fingerprint = trainer_fingerprint(self)
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

    @staticmethod
    def _check_count(value, name: str, minimum: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")

    # ------------------------------------------------------------------------------------ state

    def bind_strategy(self, fisher_data) -> None:
        """Bind the strategy to the model, the tasks and a sampler of ``fisher_data`` (the data a
        mask update draws its examples from; None: a strategy that samples raises)."""
        sample = (
            sampler(fisher_data, self.tasks, self.homogeneous, self.strategy_generator, self.device, "fisher_data")
            if fisher_data is not None
            else _no_data
        )
        if self.gradient_sync is not None and fisher_data is not None and self.parallel != "fsdp":
            sample = self.gradient_sync.shard_sampler(sample)  # each rank scores its share of the N samples
        context = TrainingContext(
            self.model, self.tasks, sample, self.strategy_generator, has_data=fisher_data is not None,
            homogeneous=self.homogeneous,
        )  # fmt: skip
        self.strategy.bind(context)
        self.strategy_bound = True

    def state_dict(self) -> dict:
        """Everything the next step depends on (model, optimizer, scheduler, grad scaler, strategy,
        every RNG stream, counters, history), as tensors and plain Python objects for ``torch.save``."""
        return trainer_state(self)

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict`; the next ``fit`` continues where that one stopped."""
        restore_trainer_state(self, state)

    def save_checkpoint(self, directory, *, keep_last: int = 3) -> Path:
        """Write :meth:`state_dict` atomically as ``directory/ckpt-<global step>.pt``; with
        ``parallel="fsdp"`` every rank writes its shards (:mod:`fsmtl.engine.sharded_checkpoint`:
        call it on every rank)."""
        if self.parallel == "fsdp":
            return sharded_checkpoint.save(self, directory, keep_last=keep_last)
        return ckpt.save_checkpoint(self.state_dict(), directory, self.global_step, keep_last=keep_last)

    def resume(self, directory) -> bool:
        """Load the newest readable checkpoint of ``directory`` (an unreadable one is skipped with a
        warning naming it; one of another run is refused); False when there is none. With
        ``parallel="fsdp"``, the newest complete sharded checkpoint, each rank its own shards."""
        if self.parallel == "fsdp":
            return sharded_checkpoint.resume(self, directory)
        return ckpt.resume(self, directory)

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
        csv_path=None,
        tensorboard_dir=None,
        restore_best: bool = False,
        patience: int | None = None,
        fisher_data=None,
        num_workers: int = 0,
        checkpoint_dir=None,
        checkpoint_every: int | None = None,
        checkpoint_unit: str = "epoch",
        keep_last: int = 3,
        progress="auto",
    ) -> dict:
        """Train for ``epochs`` more epochs (an epoch interrupted by a checkpoint counts as one);
        returns the history.

        Calling ``fit`` again continues the epoch and step counters, so ``fit(epochs=3)`` twice
        trains exactly as ``fit(epochs=6)``.

        Args:
            train: a ``Split``, or ``torch.utils.data`` data (see :mod:`fsmtl.engine.sources`).
            epochs: number of epochs (a ``Split`` epoch is ``ceil(n / batch_size)`` steps,
                heterogeneous tasks cycling through their own shuffled data, the largest setting ``n``).
            batch_size: examples per task per step (for a ``Split`` or datasets; loaders keep theirs).
            val: optional validation data (same forms as ``train``): per-task metrics every
                ``eval_every`` epochs into ``history["val"]``; the best epoch by the mean of the
                tasks' primary metrics is kept.
            log_path, csv_path, tensorboard_dir: where the records go as training runs (each
                optional; see :mod:`fsmtl.engine.fit_log`): the task losses of every step, the kept
                fraction, churn and overlap of every mask update, and every validation, as JSON
                lines, as CSV rows and to TensorBoard.
            restore_best: load the best epoch's weights at the end (needs ``val``).
            patience: stop after this many evaluations without a better score (needs ``val``).
            fisher_data: where mask updates draw their examples (default: ``train``).
            num_workers: DataLoader workers for datasets.
            checkpoint_dir: write checkpoints here every ``checkpoint_every`` ``checkpoint_unit``
                (``"epoch"`` or ``"step"``), keeping the newest ``keep_last``; also on a stop request.
            progress: ``"auto"`` (default): a progress bar on a terminal, plain lines in a log;
                None: nothing; or an object with ``update(n)`` (and optionally ``phase(name)``),
                advanced once per step.
        """
        self._check_count(epochs, "epochs", 0)
        self._check_count(eval_every, "eval_every", 1)
        if patience is not None:
            self._check_count(patience, "patience", 1)
        if (restore_best or patience is not None) and val is None:
            raise ValueError("restore_best and patience need validation data (val=...)")
        if self._plateau and val is None:
            raise ValueError(
                "a ReduceLROnPlateau scheduler needs validation data (val=...): it steps on the validation loss"
            )
        if checkpoint_unit not in ("epoch", "step"):
            raise ValueError(f"checkpoint_unit must be 'epoch' or 'step', got {checkpoint_unit!r}")
        if checkpoint_every is not None:
            self._check_count(checkpoint_every, "checkpoint_every", 1)
            if checkpoint_dir is None:
                raise ValueError("checkpoint_every needs checkpoint_dir")
        on_cuda = self.device.type == "cuda"
        sync = self.gradient_sync
        global_batch = batch_size if sync is None else sync.global_batch_size(batch_size, train)
        source = train_source(
            train, self.tasks, self.homogeneous, global_batch, self.generator,
            num_workers=num_workers, pin_memory=on_cuda,
        )  # fmt: skip
        if self.gradient_sync is not None:
            source = self.gradient_sync.shard_source(source)  # this rank's share of every global batch
        in_memory = isinstance(train, Split) or backing_split(train) is not None
        if in_memory:
            # Checked whole, once: its batches then need no per-batch value checks.
            whole = train if isinstance(train, Split) else backing_split(train)
            check_split(whole, self.tasks, self.homogeneous, "train")
        for name, data in (("val", val), ("fisher_data", fisher_data)):
            if isinstance(data, Split):
                check_split(data, self.tasks, self.homogeneous, name)
            elif data is not None:
                train_source(data, self.tasks, self.homogeneous, batch_size or 1, None, where=name)
        check_fit(self, train, val, fisher_data, batch_size, global_batch)
        self.global_batch = global_batch
        if progress is False:  # as None: no progress
            progress = None
        own_progress = isinstance(progress, str)
        if own_progress:
            if progress != "auto":
                raise ValueError(f"progress must be 'auto', None or an object with update(n), got {progress!r}")
            steps = source.steps_per_epoch
            progress = FitProgress(steps * epochs if steps is not None else None) if epochs else None
        log = FitLog([t.name for t in self.tasks], log_path=log_path, csv_path=csv_path,
                     tensorboard_dir=tensorboard_dir, write=collectives.is_main_process())  # fmt: skip
        run = _FitRun(
            source, self.epoch + epochs, in_memory, batch_size, val, eval_every, log, restore_best, patience,
            checkpoint_dir, checkpoint_every, checkpoint_unit, keep_last, progress,
        )  # fmt: skip
        self.bind_strategy(fisher_data if fisher_data is not None else train)
        self.strategy.on_fit_start(range(self.epoch, run.end_epoch), source.steps_per_epoch)
        self.model.train()
        self._progress, self._log = progress, log
        try:
            self._fit_epochs(run)
        finally:
            self._progress, self._log = None, None
            log.close()
            if own_progress and progress is not None:
                progress.close()
        if restore_best and self.best_model is not None:
            self.model.load_state_dict(self.best_model)
        if self.gradient_sync is not None:
            self.history["distributed"] = self.gradient_sync.info()
        return self.history

    def _fit_epochs(self, run: _FitRun) -> None:
        first_batch = True
        steps = run.source.steps_per_epoch
        while self.epoch < run.end_epoch and not self.history["stopped_early"]:
            batches = epoch_batches(self, run.source)
            for inputs, targets in batches:
                if first_batch or not run.in_memory:
                    # In-memory data was checked whole above; other batches are checked on the CPU
                    # (values only there, so the check never waits for the device).
                    values = all(x.device.type == "cpu" for x in inputs) or first_batch
                    check_batch(self.tasks, inputs, targets, f"train epoch {self.epoch} step {self.epoch_step}",
                                values=values)  # fmt: skip
                self._train_step(inputs, targets, probe=first_batch)
                first_batch = False
                if run.progress is not None:
                    run.progress.update(1)
                last = steps is not None and self.epoch_step == steps
                if last:
                    break
                self._after_step(run, epoch_end=False)
            self._end_epoch(run)
            self._after_step(run, epoch_end=True)

    def _after_step(self, run: _FitRun, *, epoch_end: bool) -> None:
        """Write a due checkpoint; on a stop request (SIGINT/SIGTERM) write one and raise
        :class:`~fsmtl.engine.checkpoint.TrainingInterrupted`."""
        sync = self.gradient_sync
        stop = ckpt.STOP.is_set() if sync is None else sync.stop  # all ranks agree on a stop
        directory, every, unit = run.checkpoint_dir, run.checkpoint_every, run.checkpoint_unit
        due = False
        if directory is not None and every is not None:
            count = self.epoch if unit == "epoch" else self.global_step
            due = (unit == "step" or epoch_end) and count % every == 0
        if directory is not None and (due or stop) and (collectives.is_main_process() or self.parallel == "fsdp"):
            self.save_checkpoint(directory, keep_last=run.keep_last)
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
        self._strategy_step()
        step = step_mode(self)
        try:
            losses = step.forward(inputs, targets)
            values = self._checked_loss_values(losses)
            ok = bool(torch.isfinite(values).all())
            if ok:
                step.backward(losses)
            else:
                step.discard()  # a skipped step writes no .grad
        except BaseException:
            step.discard()
            raise
        if not ok:
            self.history["skipped_nonfinite"] += 1
        else:
            step.update(inputs, targets, losses)
            self.strategy.after_optimizer_step()
            if self.scheduler is not None and self.scheduler_interval == "step":
                self.scheduler.step()
            self.epoch_totals += values.double()
            self.epoch_counted += 1
            if self._log is not None and self._log.active:
                self._log.step(self.epoch, self.global_step, values.tolist())
        self.epoch_step += 1
        self.global_step += 1

    def _strategy_step(self) -> None:
        """The strategy's per-step hook (a mask update when due), with its phase on the progress
        display when the display shows phases."""
        show = getattr(self._progress, "phase", None)
        position = (self.epoch, self.global_step, self.epoch_step == 0)
        if show is not None and self.strategy.updates_at(*position):
            show("mask update")
        record = self.strategy.on_step(*position)
        if record is not None:
            self.history["mask_updates"].append(record)
            if self._log is not None and self._log.active:
                entries = self.strategy.mask.num_entries if self.strategy.mask is not None else None
                self._log.mask_update(self.epoch, self.global_step, record, entries)
        if show is not None:
            show(self.strategy.phase)

    @property
    def _plateau(self) -> bool:
        """True when the scheduler steps on validation losses (``ReduceLROnPlateau``)."""
        return isinstance(self.scheduler, ReduceLROnPlateau)

    def _checked_loss_values(self, losses: list[torch.Tensor]) -> torch.Tensor:
        """The step's only device sync: the loss values (with several ranks, the global batch's),
        checked before anything is updated (a streamed step's gradients are still private to its
        stream). A non-finite one raises unless ``skip_nonfinite``."""
        values = torch.stack([loss.detach() for loss in losses]).cpu()
        if self.gradient_sync is not None:
            values = self.gradient_sync.reduce_losses(values, ckpt.STOP.is_set())
        finite = torch.isfinite(values)
        if not bool(finite.all()) and not self.skip_nonfinite:
            task = self.tasks[int((~finite).nonzero()[0])]
            raise FloatingPointError(
                f"non-finite loss {float(values[self.tasks.index(task)])} of task {task.name!r} at epoch "
                f"{self.epoch}, step {self.global_step} (epoch step {self.epoch_step}); nothing was updated "
                "(skip_nonfinite=True skips such steps)"
            )
        return values

    def _probe(self, inputs, targets) -> None:
        """Check each head's output shape on two samples, in eval mode without grad (so no
        BatchNorm statistic, parameter or RNG changes) before the first update."""
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                outputs = task_outputs(self, [x[:2] for x in inputs])
            for task, out, y in zip(self.tasks, outputs, targets):
                check_outputs(task, out, y[:2], "model")
        finally:
            self.model.train(was_training)

    def _end_epoch(self, run: _FitRun) -> None:
        val, eval_every, patience = run.val, run.eval_every, run.patience
        mean = self.epoch_totals / max(self.epoch_counted, 1)
        self.history["loss"].append(mean.float().tolist())
        if self.scheduler is not None and self.scheduler_interval == "epoch" and not self._plateau:
            self.scheduler.step()
        epoch = self.epoch
        self.epoch += 1
        self.epoch_step = 0
        self.epoch_totals = torch.zeros(len(self.tasks), dtype=torch.float64)
        self.epoch_counted = 0
        if val is None or self.epoch % eval_every != 0:
            return
        metrics = self.evaluate(val, batch_size=max(run.batch_size or 0, 1024))
        score = primary_score(self.tasks, metrics)
        entry = {"epoch": epoch, "step": self.global_step, "loss": self.history["loss"][-1], "metrics": metrics}
        entry["score"] = score
        self.history["val"].append(entry)
        run.log.validation(entry)
        if self._plateau:
            self.scheduler.step(-score)
        if self.history["best_score"] is None or score > self.history["best_score"]:
            self.history["best_score"], self.history["best_epoch"] = score, epoch
            if run.restore_best:
                self.best_model = copy.deepcopy(self.model.state_dict())
        elif patience is not None:
            since = sum(1 for e in self.history["val"] if e["epoch"] > self.history["best_epoch"])
            if since >= patience:
                self.history["stopped_early"] = True

    # ------------------------------------------------------------------------------ evaluation

    def predict(self, data, *, batch_size: int = 1024, output: str = "outputs") -> list[torch.Tensor]:
        """Each task's predictions on ``data``, in eval mode without gradients, with the task
        masks applied when the strategy masks the forward; float32 outputs on the CPU.

        Args:
            data: inputs alone, no targets: one tensor ``[N, ...]`` for every task (shared
                inputs) or a list of one tensor per task; or a ``Split`` or datasets/loaders as for
                ``fit`` (their targets are ignored, their order kept).
            output: ``"outputs"`` (the heads' raw outputs), ``"probabilities"`` or ``"labels"``
                (classification kinds: binary ``[N]``, multiclass ``[N, C]`` / ``[N]``, ...).
        """
        return predict(self, data, batch_size, output)

    def evaluate(self, data, *, batch_size: int = 1024) -> list[dict[str, float]]:
        """Per-task metrics (:func:`fsmtl.tasks.task_metrics`) on ``data``."""
        return evaluate(self, data, batch_size)


@dataclass
class _FitRun:
    """What one ``fit`` call trains on and until when, and what it writes on the way."""

    source: object
    end_epoch: int
    in_memory: bool
    batch_size: int | None
    val: object
    eval_every: int
    log: FitLog
    restore_best: bool
    patience: int | None
    checkpoint_dir: object
    checkpoint_every: int | None
    checkpoint_unit: str
    keep_last: int
    progress: object


def _check_sharded(model: MultiTaskModel, optimizer, strategy: Strategy, homogeneous: bool, amp) -> None:
    """What ``parallel="fsdp"`` needs, checked before anything trains; one line each."""
    if not model.is_sharded:
        raise ValueError('parallel="fsdp" needs a sharded model: call model.shard() before building the optimizer')
    own = {id(p) for p in model.parameters()}
    stale = sum(1 for g in optimizer.param_groups for p in g["params"] if id(p) not in own)
    if stale:
        raise ValueError(
            f"the optimizer holds {stale} tensor(s) that are not the sharded model's parameters: build it after "
            "model.shard() (its steps would move stale copies and the model would not train)"
        )
    if not homogeneous:
        raise ValueError('parallel="fsdp" trains homogeneous tasks (one shared forward per step)')
    if amp is not None:
        raise ValueError('with parallel="fsdp" set mixed precision with model.shard(mp_policy=...), not amp=')
    reason = strategy.sharding_unsupported()
    if reason is not None:
        raise ValueError(f'parallel="fsdp": {reason}')


def _no_data(task: int, n: int):
    raise RuntimeError("this strategy needs training data to sample from; call Trainer.fit")
