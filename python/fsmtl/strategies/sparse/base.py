"""The base of the sparse strategies (:class:`SparseStrategy`): the Trainer's side of one
:class:`~fsmtl.FSMTL` object, which holds the schedule, the task masks, the masked backward of
every step (whole, or streamed task by task) and the record of each mask update; a subclass says
how the masks are computed (:meth:`SparseStrategy.compute_mask`)."""

from __future__ import annotations

import warnings
from abc import abstractmethod
from collections.abc import Sequence

import torch

import fsmtl_kernels as fk

from ...gradients import ForwardRecord, MaskedBackwardStream, MeasuredBatching
from ...schedule import MaskSchedule
from ...sparse_training import FSMTL, check_keep_ratio
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
        check_keep_ratio(keep_ratio)
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
        self._fsmtl: FSMTL | None = None

    def fsmtl_options(self) -> dict:
        """Extra :class:`~fsmtl.FSMTL` arguments of a subclass (FisherSparse: the estimator)."""
        return {}

    @property
    def fsmtl(self) -> FSMTL:
        """The :class:`~fsmtl.FSMTL` object that holds this strategy's schedule, masks and masked
        backward (built for the bound model; masks computed by :meth:`compute_mask`)."""
        context = self.context
        if self._fsmtl is None or self._fsmtl.model is not context.model:
            self._fsmtl = FSMTL(
                context.model,
                context.tasks,
                self.keep_ratio,
                schedule=self.schedule,
                normalize=self.normalize,
                mask_forward=self.mask_forward,
                freeze_unselected=self.freeze_unselected,
                batched=self.batched_grads,
                generator=context.generator,
                compute=self._compute,
                **self.fsmtl_options(),
            )
        return self._fsmtl

    def bind(self, context) -> None:
        super().bind(context)
        if isinstance(self.keep_ratio, int):
            check_keep_ratio(self.keep_ratio, context.model, stacklevel=4)
        self.fsmtl.generator = context.generator

    def _compute(self, sample) -> fk.PackedMask:
        return self.compute_mask()

    @abstractmethod
    def compute_mask(self) -> fk.PackedMask:
        """New masks for all tasks, from the current model (examples from ``context.sample``)."""

    @property
    def mask(self) -> fk.PackedMask | None:
        return self._fsmtl.masks if self._fsmtl is not None else None

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
        return self.fsmtl.forward_record()

    def update_mask(self, epoch: int = -1, step: int = -1) -> dict:
        """Recompute the masks now; returns the record (ones, churn, overlap) of this update."""
        return self.fsmtl.recompute(self.context.sample, epoch=epoch, step=step)

    def set_mask(self, mask: fk.PackedMask) -> None:
        self.fsmtl.set_masks(mask)

    def forward_mask(self, task: int) -> list[torch.Tensor] | None:
        return None if self._fsmtl is None else self._fsmtl.forward_mask(task)

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
        if self._fsmtl is None:  # not bound yet: no masks, and no generator of its own
            return {"masks": None, "updates": [], "generator": None}
        return self.fsmtl.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.fsmtl.load_state_dict(state)

    def streams_backward(self) -> bool:
        """Whether a step whose tasks run separate trunk forwards (``mask_forward``, heterogeneous
        tasks) may pass its losses one task at a time to :meth:`open_backward_stream` instead of
        all at once to :meth:`backward`: when a mask is set and there are several tasks, where
        :meth:`backward` takes the same T backward passes. Not in the warm-up (no mask: dense MTL
        is one backward of the summed loss) nor for a single task (one trunk forward, for which
        :meth:`backward` may batch and cut at the boundary)."""
        return self._fsmtl is not None and self._fsmtl.streams_backward()

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
        return self.fsmtl.open_backward_stream()

    def sharding_unsupported(self) -> str | None:
        if self.mask_forward:
            return "mask_forward runs each task's forward on S_t * theta, which FSDP's sharded parameters do not allow"
        if self.freeze_unselected:
            return "freeze_unselected restores entries from full-size masks, which sharded parameters do not have"
        return None

    def backward(self, losses: Sequence[torch.Tensor], record: ForwardRecord | None = None) -> None:
        self.fsmtl.backward(losses, record)

    def before_optimizer_step(self) -> None:
        self.fsmtl.before_optimizer_step()

    def after_optimizer_step(self) -> None:
        self.fsmtl.after_optimizer_step()
