"""FSMTL for any training loop: each task's Fisher top-K mask (:func:`compute_masks`), and the mask
schedule, the masks and the masked multi-task backward in one object (:class:`FSMTL`), which a
hand-written loop, the Trainer's sparse strategies, the Lightning module and the Hugging Face
Trainer subclass all use.

A hand-written multi-task loop needs three changed lines::

    fs = fsmtl.FSMTL(model, tasks, keep_ratio=0.5, warmup=2, every=2)
    for epoch in range(epochs):
        fs.update_masks(epoch, train_data)      # recomputes the masks when the schedule says so
        for x, ys in loader:
            losses = [task_loss(model(x, t), y) for t, y in enumerate(ys)]
            optimizer.zero_grad()
            fs.backward(losses)                 # instead of sum(losses).backward()
            optimizer.step()
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

import fsmtl_kernels as fk

from .collectives import broadcast_buffers, check_identical, reduce_scores
from .data.batches import sampler
from .estimators import ESTIMATORS, task_scores
from .gradients import (
    BackwardPath,
    ForwardRecord,
    MaskedBackwardStream,
    MeasuredBatching,
    dense_multitask_backward,
    masked_multitask_backward,
)
from .gradients.sharded import sharded_masked_backward
from .model import MultiTaskModel
from .schedule import MaskSchedule
from .tasks import Task
from .tasks.checks import check_batch

Sample = Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]

#: An int keep ratio below this share of the masked entries draws a warning: ``FSMTL(..., 30)``
#: keeps 30 entries, which is rarely what was meant (``0.3`` keeps 30%).
TINY_COUNT_SHARE = 0.01


def compute_masks(
    model: MultiTaskModel,
    tasks: Sequence[Task],
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    keep_ratio: float | int,
    *,
    estimator: str = "fs",
    chunk_size: int = 32,
    reduce: bool = True,
) -> fk.PackedMask:
    """Each task's top-``keep_ratio`` trunk entries by ``estimator`` score (Algorithm 2).

    Args:
        model: the multi-task model (its dense trunk is scored).
        tasks: the T tasks, in head order.
        batches: one ``(inputs, targets)`` pair per task, e.g. N sampled training examples.
        keep_ratio: float in ``(0, 1]`` or int count of kept entries per task.
        estimator: ``fs``, ``efs``, ``grad2`` or ``absgrad`` (see :mod:`fsmtl.estimators`).
        reduce: on several ranks, sum the scores of every rank's batches (each rank scored its
            share of the samples); False when every rank scored the same samples.

    Returns:
        A :class:`fsmtl_kernels.PackedMask` with T tasks over ``model.masked_parameters()``.
    """
    if len(tasks) != model.num_tasks or len(batches) != model.num_tasks:
        raise ValueError(
            f"tasks ({len(tasks)}) and batches ({len(batches)}) must have one entry per head ({model.num_tasks})"
        )
    fk.check_k(keep_ratio, "keep_ratio")
    if keep_ratio <= 0:
        raise ValueError(f"keep_ratio must be > 0, got {keep_ratio!r}")
    for t, (task, batch) in enumerate(zip(tasks, batches)):
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise TypeError(f"compute_masks: batches[{t}] (task {task.name!r}) must be an (inputs, targets) pair")
    # Lengths, empty data, target dtype/shape/range and NaN, per task, before any scoring.
    check_batch(tasks, [b[0] for b in batches], [b[1] for b in batches], "compute_masks batches")
    per_task = [
        task_scores(model, t, task, x, y, estimator, chunk_size=chunk_size)
        for t, (task, (x, y)) in enumerate(zip(tasks, batches))
    ]
    # Several ranks (each scored its share of the samples): one all-reduce of the weighted scores.
    if reduce:
        per_task = reduce_scores(per_task, [b[0].shape[0] for b in batches])
    return fk.topk_mask_batched([torch.stack(s) for s in zip(*per_task)], keep_ratio)


class FSMTL:
    """Task masks over a model's masked trunk parameters, recomputed on a schedule, and the masked
    multi-task backward (paper Eq. 4) of the user's own per-task losses.

    Args:
        model: a :class:`~fsmtl.MultiTaskModel` (the masks cover ``model.masked_parameters()``).
        tasks: the T :class:`~fsmtl.Task` s, in head order (their kinds define the likelihood
            the Fisher estimate differentiates).
        keep_ratio: the share p of the masked entries each task keeps, a float in ``(0, 1]``
            (``k = floor(p * P + 1/2)``), or an int count of entries.
        warmup, every, unit: the schedule (:class:`~fsmtl.MaskSchedule`): dense training for
            ``warmup`` epochs (or steps, ``unit="step"``), then new masks every ``every``.
        schedule: a :class:`~fsmtl.MaskSchedule` instead of ``warmup``/``every``/``unit``.
        samples: examples per task for each Fisher estimate.
        estimator: the score: ``fs`` (Eq. 10), ``efs`` (Eq. 9), ``grad2`` or ``absgrad``
            (Algorithm 2); see :mod:`fsmtl.estimators`.
        normalize: ``"tasks"`` divides the masked sum by T (the paper); ``"selected"`` by the
            number of tasks holding each entry.
        mask_forward: run task t's forward on ``S_t * theta_sh`` (Eq. 3; pass
            :meth:`forward_mask` to the model's forward); False keeps the dense forward and masks
            only the update.
        freeze_unselected: restore, after every optimizer step, the entries no task holds (call
            :meth:`before_optimizer_step` / :meth:`after_optimizer_step` around it).
        batched: how the T task gradients of one shared trunk forward are taken (see
            :func:`fsmtl.masked_multitask_backward`): True, False, ``"auto"`` or ``"measure"``.
        homogeneous: all tasks share their inputs (one batch feeds T heads); False: each task has
            its own data (``update_masks``' data is then one dataset or loader per task).
        chunk_size: samples per chunk of the Fisher engine's fallback.
        generator: the generator that draws the Fisher samples (default: a new one seeded with
            ``seed``); its state is part of :meth:`state_dict`.
        seed: the seed of the default generator.
        compute: a function ``compute(sample) -> PackedMask`` replacing the Fisher top-K (the
            random masks of RS, the variants of FS); ``sample(t, n)`` draws n examples of task t.

    Attributes:
        masks: the current :class:`fsmtl_kernels.PackedMask` (T tasks), None during the warm-up.
        updates: the mask updates so far, each a record: epoch, step, ones per task, churn
            (per task, the share of the new mask's ones that were not in the old one) and the
            task-by-task overlap (Jaccard).
    """

    def __init__(
        self,
        model: MultiTaskModel,
        tasks: Sequence[Task],
        keep_ratio: float | int,
        *,
        warmup: int = 1,
        every: int = 1,
        unit: str = "epoch",
        schedule: MaskSchedule | None = None,
        samples: int = 256,
        estimator: str = "fs",
        normalize: str = "tasks",
        mask_forward: bool = False,
        freeze_unselected: bool = False,
        batched: bool | str | MeasuredBatching = "auto",
        homogeneous: bool = True,
        chunk_size: int = 32,
        generator: torch.Generator | None = None,
        seed: int = 0,
        compute: Callable[[Sample], fk.PackedMask] | None = None,
    ) -> None:
        if not isinstance(model, MultiTaskModel):
            raise TypeError(f"model must be a fsmtl.MultiTaskModel, got {type(model).__name__}")
        tasks = list(tasks)
        if len(tasks) != model.num_tasks:
            raise ValueError(f"tasks has {len(tasks)} entries but the model has {model.num_tasks} heads")
        for t, task in enumerate(tasks):
            if not isinstance(task, Task):
                raise TypeError(f"tasks[{t}] must be a fsmtl.Task, got {type(task).__name__}")
        check_keep_ratio(keep_ratio, model)
        if schedule is None:
            schedule = MaskSchedule(warmup=warmup, every=every, unit=unit)
        elif not isinstance(schedule, MaskSchedule):
            raise TypeError(f"schedule must be a fsmtl.MaskSchedule, got {type(schedule).__name__}")
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise ValueError(f"samples must be a positive int, got {samples!r}")
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {tuple(ESTIMATORS)}, got {estimator!r}")
        if normalize not in fk.NORMALIZE_MODES:
            raise ValueError(f"normalize must be one of {fk.NORMALIZE_MODES}, got {normalize!r}")
        if not isinstance(batched, MeasuredBatching) and batched not in (True, False, "auto", "measure"):
            raise ValueError(f"batched must be True, False, 'auto', 'measure' or a MeasuredBatching, got {batched!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        self.model = model
        self.tasks = tasks
        self.keep_ratio = keep_ratio
        self.schedule = schedule
        self.samples = samples
        self.estimator = estimator
        self.normalize = normalize
        self.mask_forward = bool(mask_forward)
        self.freeze_unselected = bool(freeze_unselected)
        self.batched = MeasuredBatching() if batched == "measure" else batched
        self.homogeneous = bool(homogeneous)
        self.chunk_size = chunk_size
        self.generator = generator if generator is not None else torch.Generator().manual_seed(seed)
        self.compute = compute
        self.masks: fk.PackedMask | None = None
        self.updates: list[dict] = []
        self._forward_masks: list[list[torch.Tensor]] | None = None
        self._unselected: list[torch.Tensor] | None = None
        self._frozen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    # ----------------------------------------------------------------------------- the schedule

    def due(self, epoch: int = -1, step: int = -1, *, epoch_start: bool = True) -> bool:
        """Whether the schedule recomputes the masks at this position (``epoch`` for an epoch
        schedule, at the epoch's start; ``step``, the global step, for a step schedule)."""
        return self.schedule.due(epoch, step, epoch_start)

    def update_masks(
        self, epoch: int | None = None, data=None, *, step: int | None = None, epoch_start: bool = True
    ) -> bool:
        """Recompute the masks when the schedule says so; returns whether it did.

        Call it at the start of every epoch with the epoch index (an epoch schedule), or before
        every step with the global step (``step=``, a step schedule). ``data`` is where the
        Fisher samples come from: a :class:`~fsmtl.data.Split`, a dataset or loader (one per task
        for heterogeneous tasks) as the Trainer takes, or a function ``sample(t, n) -> (inputs,
        targets)``; it is read only when an update is due.
        """
        unit = self.schedule.unit
        if unit == "epoch" and epoch is None:
            raise TypeError("update_masks needs the epoch index for an epoch schedule: update_masks(epoch, data)")
        if unit == "step" and step is None:
            raise TypeError("update_masks needs step= (the global step) for a step schedule")
        epoch, step = -1 if epoch is None else epoch, -1 if step is None else step
        if not self.due(epoch, step, epoch_start=epoch_start):
            return False
        if data is None:
            raise ValueError(f"the masks are due at epoch {epoch}, step {step}: pass the data to sample from")
        self.recompute(self.sampler(data), epoch=epoch, step=step)
        return True

    def sampler(self, data) -> Sample:
        """``sample(t, n)`` drawing ``n`` examples of task ``t`` from ``data`` onto the model's
        device, with this object's generator (``data`` may already be such a function)."""
        if callable(data) and not isinstance(data, torch.nn.Module) and not hasattr(data, "__iter__"):
            return data
        device = self.model.masked_parameters()[0].device
        return sampler(data, self.tasks, self.homogeneous, self.generator, device, "update_masks data")

    def recompute(self, sample: Sample, *, epoch: int = -1, step: int = -1) -> dict:
        """New masks now, from examples drawn by ``sample(t, n)``; returns (and keeps in
        :attr:`updates`) the record of this update."""
        new = self.compute(sample) if self.compute is not None else self.fisher_masks(sample)
        check_identical(new)  # several ranks: one checksum all-reduce; raises if the masks differ
        record = {
            "epoch": epoch,
            "step": step,
            "ones": new.count().tolist(),
            "churn": mask_churn(self.masks, new) if self.masks is not None else None,
            "overlap": new.overlap().tolist(),
        }
        self.set_masks(new)
        self.updates.append(record)
        return record

    def fisher_masks(self, sample: Sample) -> fk.PackedMask:
        """Each task's top-``keep_ratio`` entries by :attr:`estimator` score on ``samples`` examples.

        A model sharded with FSDP2 is scored on a full copy gathered from every rank (with rank 0's
        buffers, such as BatchNorm statistics), every rank scoring the same samples: the masks are
        the ones one process computes from the same weights, bit for bit, on every rank (for the
        time of the update each rank holds the full trunk and its scores)."""
        batches = [sample(t, self.samples) for t in range(len(self.tasks))]
        sharded = self.model.is_sharded
        model = self.model.full_copy() if sharded else self.model
        if sharded:  # every rank scores the same samples: with rank 0's BatchNorm statistics too
            broadcast_buffers(model)
        masks = compute_masks(
            model, self.tasks, batches, self.keep_ratio, estimator=self.estimator, chunk_size=self.chunk_size,
            reduce=not sharded,
        )  # fmt: skip
        return masks.to(self.model.masked_parameters()[0].device)

    def set_masks(self, masks: fk.PackedMask) -> None:
        """Use ``masks`` (T tasks over the model's masked parameters) from now on."""
        if not isinstance(masks, fk.PackedMask):
            raise TypeError(f"masks must be a fsmtl_kernels.PackedMask, got {type(masks).__name__}")
        params = self.model.masked_parameters()
        if masks.shapes != tuple(p.shape for p in params):
            raise ValueError("masks do not cover the model's masked parameters (other shapes)")
        if masks.num_tasks != len(self.tasks):
            raise ValueError(f"masks hold {masks.num_tasks} tasks, the model has {len(self.tasks)}")
        self.masks = masks
        stacked = masks.to_bool_stacked()
        # Per task, views into the stacked bool masks: no copy per task or per step.
        self._forward_masks = [[m[t] for m in stacked] for t in range(masks.num_tasks)] if self.mask_forward else None
        # Entries no task holds: only needed to freeze them, and fixed until the next mask update.
        self._unselected = [~m.any(0) for m in stacked] if self.freeze_unselected else None

    @property
    def kept_fraction(self) -> list[float] | None:
        """Per task, the share of the masked entries its mask keeps (None during the warm-up)."""
        if self.masks is None:
            return None
        return (self.masks.count().double() / self.masks.num_entries).tolist()

    # ------------------------------------------------------------------------------ the update

    def forward_mask(self, task: int) -> list[torch.Tensor] | None:
        """Task ``task``'s bool masks for its forward (``model(x, task, fs.forward_mask(task))``)
        with ``mask_forward``; None otherwise and during the warm-up."""
        return None if self._forward_masks is None else self._forward_masks[task]

    def forward_record(self) -> ForwardRecord:
        """A record for one step's forwards (``model(x, t, record=r)``), which :meth:`backward`
        then takes for the fused Linear weight gradient and the single backward below the masks."""
        return ForwardRecord(linear_calls=True)

    def backward(self, losses: Sequence[torch.Tensor], record: ForwardRecord | None = None) -> BackwardPath | None:
        """Write ``.grad`` from the T task losses of one step: during the warm-up, dense MTL (one
        backward of the summed loss, the shared trunk getting the task average); then the masked
        average ``sum_t S_t * g_t / T`` on the masked parameters, the task average on the other
        trunk parameters and each head its own task's gradient. Returns the path the masked
        backward took (None in the warm-up). Existing ``.grad`` of the trunk is overwritten."""
        if isinstance(losses, torch.Tensor):
            raise TypeError(
                "losses must be a list of the T task losses (scalar tensors), not one tensor: the masked update "
                "needs each task's gradient, not the gradient of their sum"
            )
        losses = list(losses)
        if len(losses) != len(self.tasks):
            raise ValueError(f"{len(losses)} losses for {len(self.tasks)} tasks: pass one loss per task, in head order")
        model = self.model
        if self.masks is None:  # warm-up: dense MTL, one backward pass instead of T
            dense_multitask_backward(losses, model.shared_parameters())
            return None
        if model.is_sharded:
            if record is None:
                raise ValueError("a sharded model's masked backward needs the record of the step's forward (record=)")
            sharded_masked_backward(model, losses, self.masks, record, normalize=self.normalize)
            return None
        # Losses from separate trunk forwards (heterogeneous tasks, mask_forward) share no graph to
        # batch over: T backward passes, streamed into the masked sum.
        trunk_forwards = record.trunk_forwards if record is not None else 1
        return masked_multitask_backward(
            losses,
            model.masked_parameters(),
            self.masks,
            dense_params=model.dense_shared_parameters(),
            head_params=model.head_parameters(),
            normalize=self.normalize,
            batched=self.batched if trunk_forwards <= 1 else False,
            record=record,
        )

    def streams_backward(self) -> bool:
        """Whether losses of separate trunk forwards may be backwarded one task at a time
        (:meth:`open_backward_stream`): when masks are set and there are several tasks."""
        return self.masks is not None and self.masks.num_tasks > 1

    def open_backward_stream(self) -> MaskedBackwardStream:
        """The masked backward for losses that arrive one task at a time: run task t's forward,
        its loss and ``stream.backward(t, loss)`` before task t + 1's forward (one task graph
        alive), then ``stream.finish()``; the same ``.grad`` as :meth:`backward` bit for bit.
        Call it with the model's ``.grad`` set to None."""
        if not self.streams_backward():
            raise RuntimeError("open_backward_stream needs masks and several tasks: use backward(losses)")
        model = self.model
        return MaskedBackwardStream(
            model.masked_parameters(),
            self.masks,
            num_tasks=self.masks.num_tasks,
            dense_params=model.dense_shared_parameters(),
            head_params=model.head_parameters(),
            normalize=self.normalize,
        )

    def before_optimizer_step(self) -> None:
        """With ``freeze_unselected``: remember the entries no task holds (call before ``step()``)."""
        if self._unselected is None:
            return
        params = self.model.masked_parameters()
        self._frozen = [(p, p.detach().clone(), u) for p, u in zip(params, self._unselected)]

    def after_optimizer_step(self) -> None:
        """With ``freeze_unselected``: put the entries no task holds back (call after ``step()``)."""
        with torch.no_grad():
            for p, saved, unselected in self._frozen:
                p.copy_(torch.where(unselected, saved, p))
        self._frozen = []

    # ------------------------------------------------------------------------ state and export

    def state_dict(self) -> dict:
        """The masks, the update records and the Fisher sampler's generator state: save it with the
        model and optimizer, and a resumed loop continues with the same masks."""
        return {
            "masks": self.masks.state_dict() if self.masks is not None else None,
            "updates": [dict(u) for u in self.updates],
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` (masks moved to the model's device)."""
        if not isinstance(state, dict) or set(state) != {"masks", "updates", "generator"}:
            keys = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"not an FSMTL state (keys masks, updates, generator): got {keys}")
        masks = None
        if state["masks"] is not None:
            device = self.model.masked_parameters()[0].device
            masks = fk.PackedMask.from_state_dict(state["masks"]).to(device)
            self.set_masks(masks)  # checks shapes and tasks before anything is kept
        else:
            self.masks, self._forward_masks, self._unselected = None, None, None
        if state["generator"] is not None:  # None: the state of a strategy saved before it was bound
            self.generator.set_state(state["generator"])
        self.updates = [dict(u) for u in state["updates"]]

    def export_task(self, task: int) -> torch.nn.Sequential:
        """Task ``task``'s inference model with its mask baked in (the dense trunk during the
        warm-up): see :meth:`fsmtl.MultiTaskModel.export_task`."""
        return self.model.export_task(task, self.masks)

    def save_task_models(self, directory) -> Path:
        """One inference model per task in ``directory``: see
        :meth:`fsmtl.MultiTaskModel.save_task_models`."""
        return self.model.save_task_models(directory, self.masks, names=[t.name for t in self.tasks])


def check_keep_ratio(keep_ratio, model: MultiTaskModel | None = None, stacklevel: int = 3) -> None:
    """``keep_ratio`` is a float in ``(0, 1]`` or a positive int count; an int that is a tiny share
    of the model's masked entries draws a warning suggesting the float ratio meant."""
    fk.check_k(keep_ratio, "keep_ratio")
    if keep_ratio <= 0:  # 0 would freeze the whole trunk: never a useful run, so refuse it here
        raise ValueError(f"keep_ratio must be > 0 (a fraction in (0, 1] or a positive count), got {keep_ratio!r}")
    if model is None or not isinstance(keep_ratio, int) or isinstance(keep_ratio, bool):
        return
    total = sum(p.numel() for p in model.masked_parameters())
    if keep_ratio > total:
        raise ValueError(f"keep_ratio={keep_ratio} entries is more than the {total} masked entries")
    if keep_ratio < TINY_COUNT_SHARE * total:
        warnings.warn(
            f"keep_ratio={keep_ratio} is an int: each task keeps {keep_ratio} of the {total:,} masked entries "
            f"({100 * keep_ratio / total:.3g}%); pass a float for a share (e.g. {min(keep_ratio / 100, 1.0)!r} "
            f"for {min(keep_ratio, 100)}%)",
            UserWarning,
            stacklevel=stacklevel,
        )


def mask_churn(old: fk.PackedMask, new: fk.PackedMask) -> list[float]:
    """Per task, the fraction of the new mask's ones that were not in the old mask."""
    changed = fk.popcount(new.words & ~old.words).sum(1).double()
    return (changed / new.count().clamp_min(1).double()).tolist()
