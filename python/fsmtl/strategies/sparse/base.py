"""The base of the sparse strategies (:class:`SparseStrategy`): task masks recomputed on a schedule,
the masked backward of every step (whole, or streamed task by task), and the record of each mask
update (ones, churn, overlap)."""

from __future__ import annotations

import warnings
from abc import abstractmethod
from collections.abc import Sequence

import torch

import fsmtl_kernels as fk

from ...collectives import check_identical
from ...gradients import (
    ForwardRecord,
    MaskedBackwardStream,
    MeasuredBatching,
    dense_multitask_backward,
    masked_multitask_backward,
)
from ...schedule import MaskSchedule
from ..base import Strategy


class SparseStrategy(Strategy):
    """Masks ``S_t`` over the masked trunk parameters, updated on a :class:`MaskSchedule`.

    Args:
        keep_ratio: the fraction p of masked trunk entries each task keeps, in ``(0, 1]``
            (``k = floor(p * P + 1/2)``), or an int count.
        schedule: warm-up and update frequency.
        mask_forward: True runs task t's forward on ``S_t * theta_sh`` (Eq. 3); False keeps the
            dense forward and masks only the update (Eq. 4).
        normalize: ``"tasks"`` (divide by T, the paper) or ``"selected"`` (by the number of
            tasks holding the entry).
        freeze_unselected: restore, after every optimizer step, the entries no task holds. Without
            it, an entry outside every mask gets a zero gradient, so plain SGD leaves it alone,
            but momentum keeps moving it by its old velocity and weight decay shrinks it.
        batched_grads: how the T per-task gradients are computed when the tasks share one trunk
            forward: ``True`` batched vector-Jacobian products, ``False`` T backward passes,
            ``"auto"`` (default) the rule of :func:`fsmtl.gradients.auto_batched`,
            ``"measure"`` the faster of the two, timed once at the first masked step
            (:class:`fsmtl.gradients.MeasuredBatching`). Separate
            trunk forwards (heterogeneous tasks, ``mask_forward``) always take T backward passes;
            the Trainer runs each right after its task's forward (:meth:`open_backward_stream`).
            Either way each task's gradient is streamed into the masked sum (no ``[T, P]``
            buffer), and trunk layers below ``masked_modules`` get one backward of the summed loss.
    """

    def __init__(
        self,
        keep_ratio: float | int,
        *,
        schedule: MaskSchedule | None = None,
        mask_forward: bool = False,
        normalize: str = "tasks",
        freeze_unselected: bool = False,
        batched_grads: bool | str = "auto",
    ) -> None:
        fk.check_k(keep_ratio, "keep_ratio")
        if keep_ratio <= 0:  # 0 would freeze the whole trunk: never a useful run, so refuse it here
            raise ValueError(f"keep_ratio must be > 0 (a fraction in (0, 1] or a positive count), got {keep_ratio!r}")
        if normalize not in fk.NORMALIZE_MODES:
            raise ValueError(f"normalize must be one of {fk.NORMALIZE_MODES}, got {normalize!r}")
        self.keep_ratio = keep_ratio
        self.schedule = schedule if schedule is not None else MaskSchedule()
        if not isinstance(self.schedule, MaskSchedule):
            raise TypeError("schedule must be a MaskSchedule")
        self.mask_forward = bool(mask_forward)
        self.normalize = normalize
        self.freeze_unselected = bool(freeze_unselected)
        if batched_grads not in (True, False, "auto", "measure"):
            raise ValueError(f"batched_grads must be True, False, 'auto' or 'measure', got {batched_grads!r}")
        self.batched_grads = MeasuredBatching() if batched_grads == "measure" else batched_grads
        self.mask: fk.PackedMask | None = None
        self._forward_masks: list[list[torch.Tensor]] | None = None
        self._unselected: list[torch.Tensor] | None = None
        self._frozen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    @abstractmethod
    def compute_mask(self) -> fk.PackedMask:
        """New masks for all tasks, from the current model."""

    def updates_at(self, epoch: int, step: int, epoch_start: bool) -> bool:
        return self.schedule.due(epoch, step, epoch_start)

    def on_step(self, epoch: int, step: int, epoch_start: bool) -> dict | None:
        if not self.updates_at(epoch, step, epoch_start):
            return None
        return self.update_mask(epoch, step)

    @property
    def phase(self) -> str:
        return "warm-up" if self.mask is None else "training"

    def forward_record(self) -> ForwardRecord:
        """A record with the masked Linear calls: :meth:`backward` takes the fused weight gradient."""
        return ForwardRecord(linear_calls=True)

    def update_mask(self, epoch: int = -1, step: int = -1) -> dict:
        """Recompute the masks now; returns the record (ones, churn, overlap) of this update."""
        new = self.compute_mask()
        check_identical(new)  # several ranks: one checksum all-reduce; raises if the masks differ
        record = {
            "epoch": epoch,
            "step": step,
            "ones": new.count().tolist(),
            "churn": mask_churn(self.mask, new) if self.mask is not None else None,
            "overlap": new.overlap().tolist(),
        }
        self.set_mask(new)
        return record

    def set_mask(self, mask: fk.PackedMask) -> None:
        params = self.context.model.masked_parameters()
        if mask.shapes != tuple(p.shape for p in params):
            raise ValueError("mask does not cover the model's masked parameters")
        self.mask = mask
        stacked = mask.to_bool_stacked()
        # Per task, views into the stacked bool masks: no copy per task or per step.
        self._forward_masks = [[m[t] for m in stacked] for t in range(mask.num_tasks)] if self.mask_forward else None
        # Entries no task holds: only needed to freeze them, and fixed until the next mask update.
        self._unselected = [~m.any(0) for m in stacked] if self.freeze_unselected else None

    def forward_mask(self, task: int) -> list[torch.Tensor] | None:
        return None if self._forward_masks is None else self._forward_masks[task]

    def on_fit_start(self, epochs: range, steps_per_epoch: int | None) -> None:
        if self.mask is not None or len(epochs) == 0:
            return
        if self.schedule.unit == "epoch":
            due = any(self.schedule.due(e, -1, True) for e in epochs)
        else:
            due = steps_per_epoch is None or self.schedule.warmup < epochs.stop * steps_per_epoch
        if not due:
            warnings.warn(
                f"{type(self).__name__}: the warm-up ({self.schedule.warmup} {self.schedule.unit}s) covers the whole "
                f"run (epochs {epochs.start}..{epochs.stop - 1}): no mask is computed, this trains as dense MTL",
                UserWarning,
                stacklevel=3,
            )

    def state_dict(self) -> dict:
        return {"mask": self.mask.state_dict() if self.mask is not None else None}

    def load_state_dict(self, state: dict) -> None:
        if state.get("mask") is None:
            self.mask, self._forward_masks, self._unselected = None, None, None
            return
        device = self.context.model.masked_parameters()[0].device
        self.set_mask(fk.PackedMask.from_state_dict(state["mask"]).to(device))

    def streams_backward(self) -> bool:
        """Whether a step whose tasks run separate trunk forwards (``mask_forward``, heterogeneous
        tasks) may pass its losses one task at a time to :meth:`open_backward_stream` instead of
        all at once to :meth:`backward`: when a mask is set and there are several tasks, where
        :meth:`backward` takes the same T backward passes. Not in the warm-up (no mask: dense MTL
        is one backward of the summed loss) nor for a single task (one trunk forward, for which
        :meth:`backward` may batch and cut at the boundary)."""
        return self.mask is not None and self.mask.num_tasks > 1

    def open_backward_stream(self) -> MaskedBackwardStream:
        """This step's masked backward for losses that arrive one task at a time: a
        :class:`fsmtl.MaskedBackwardStream` over this strategy's mask and normalization.

        The caller (the Trainer) runs task t's forward (under :meth:`forward_mask`), its loss and
        ``stream.backward(t, loss)`` before task t + 1's forward, so one task graph is alive at a
        time, then ``stream.finish()``; or ``stream.close()`` to abandon the step without writing
        ``.grad``. ``finish`` writes the ``.grad`` :meth:`backward` writes for the same losses of
        separate forwards, bit for bit: the same T backward passes in the same order (with
        several separate forwards every dense trunk parameter reaches the losses through an
        earlier task's own graph, so :meth:`backward` cuts nothing off at the boundary either).
        Call it with the model's ``.grad`` set to None (``zero_grad(set_to_none=True)``): the
        stream takes the masked, dense and head parameters' ``.grad`` over until it is closed.
        """
        if not self.streams_backward():
            raise RuntimeError(
                f"{type(self).__name__}.open_backward_stream needs a mask and several tasks "
                "(streams_backward() is False): use backward(losses)"
            )
        model = self.context.model
        return MaskedBackwardStream(
            model.masked_parameters(),
            self.mask,
            num_tasks=self.mask.num_tasks,
            dense_params=model.dense_shared_parameters(),
            head_params=model.head_parameters(),
            normalize=self.normalize,
        )

    def backward(self, losses: Sequence[torch.Tensor], record: ForwardRecord | None = None) -> None:
        model = self.context.model
        trunk_forwards = record.trunk_forwards if record is not None else 1
        if self.mask is None:  # warm-up: dense MTL, one backward pass instead of T
            dense_multitask_backward(losses, model.shared_parameters())
            return
        # Losses from separate trunk forwards (heterogeneous tasks, mask_forward) share no graph to
        # batch over: T backward passes, streamed into the masked sum (the Trainer streams them
        # as they arrive instead, through open_backward_stream).
        batched = self.batched_grads if trunk_forwards <= 1 else False
        masked_multitask_backward(
            losses,
            model.masked_parameters(),
            self.mask,
            dense_params=model.dense_shared_parameters(),
            head_params=model.head_parameters(),
            normalize=self.normalize,
            batched=batched,
            record=record,
        )

    def before_optimizer_step(self) -> None:
        if self._unselected is None:
            return
        params = self.context.model.masked_parameters()
        self._frozen = [(p, p.detach().clone(), u) for p, u in zip(params, self._unselected)]

    def after_optimizer_step(self) -> None:
        with torch.no_grad():
            for p, saved, unselected in self._frozen:
                p.copy_(torch.where(unselected, saved, p))
        self._frozen = []


def mask_churn(old: fk.PackedMask, new: fk.PackedMask) -> list[float]:
    """Per task, the fraction of the new mask's ones that were not in the old mask."""
    changed = fk.popcount(new.words & ~old.words).sum(1).double()
    return (changed / new.count().clamp_min(1).double()).tolist()
