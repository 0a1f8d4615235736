"""FSMTL in PyTorch Lightning: :class:`FSMTLModule`, a LightningModule with manual optimisation
around one :class:`~fsmtl.FSMTL` object (needs ``pip install lightning``, or the extra
``fsmtl-kernels[lightning]``).

Subclass it, build the :class:`~fsmtl.MultiTaskModel` and the :class:`~fsmtl.FSMTL` object in
``__init__``, and write :meth:`FSMTLModule.task_losses` (the T losses of a batch) and
``configure_optimizers``. The module then, for every training batch, zeroes the gradients, runs
the masked multi-task backward, and steps the optimizer; at each epoch's start it recomputes the
masks when the schedule says so (Fisher samples drawn from :meth:`FSMTLModule.fisher_data`, by
default the training data); it logs the task losses and, at every mask update, the kept fraction,
churn and overlap of the masks through ``self.log``; and it saves the masks in Lightning's
checkpoints and restores them on resume.

Under Lightning's DDP strategy (``strategy="ddp"``, gloo on CPU, NCCL on CUDA) DDP's own gradient
reduction is switched off for this module (its per-task backward passes are not one backward of
one loss), and the combined gradients are averaged over the ranks with one all-reduce per step;
the Fisher scores are summed over the ranks, so every rank takes the same masks (checked).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
import torch.distributed as dist

try:
    import lightning.pytorch as pl
except ImportError as exc:  # an optional extra: say how to get it
    raise ImportError(
        'fsmtl.lightning needs PyTorch Lightning: pip install lightning (or pip install "fsmtl-kernels[lightning]")'
    ) from exc

from .collectives import world
from .sparse_training import FSMTL

#: The key of the FSMTL state in a Lightning checkpoint.
CHECKPOINT_KEY = "fsmtl"


class FSMTLModule(pl.LightningModule, ABC):
    """A LightningModule trained with FSMTL's masked multi-task update.

    Subclasses set ``self.fsmtl`` (an :class:`~fsmtl.FSMTL` over a :class:`~fsmtl.MultiTaskModel`
    that is a submodule of this module) in ``__init__``, and implement :meth:`task_losses` and
    ``configure_optimizers`` (one optimizer).
    """

    fsmtl: FSMTL

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    @abstractmethod
    def task_losses(self, batch, batch_idx: int) -> Sequence[torch.Tensor]:
        """The T task losses (scalar tensors, in head order) of one training batch."""

    def fisher_data(self):
        """Where the mask updates draw their Fisher samples: by default the training data
        (``trainer.train_dataloader``); any form :meth:`fsmtl.FSMTL.update_masks` takes."""
        return self.trainer.train_dataloader

    def on_train_start(self) -> None:
        wrapped = self.trainer.strategy.model
        if isinstance(wrapped, torch.nn.parallel.DistributedDataParallel):
            # The masked backward runs T backward passes (or writes .grad itself): DDP's reducer,
            # which expects one backward of one loss, stays out; the step all-reduces instead.
            wrapped.require_backward_grad_sync = False
        device = self.fsmtl.model.masked_parameters()[0].device
        if self.fsmtl.masks is not None and self.fsmtl.masks.device != device:
            self.fsmtl.set_masks(self.fsmtl.masks.to(device))  # restored from a checkpoint on another device

    def on_train_epoch_start(self) -> None:
        if self.fsmtl.update_masks(self.current_epoch, self.fisher_data()):
            record = self.fsmtl.updates[-1]
            kept = self.fsmtl.kept_fraction
            for task, fraction in zip(self.fsmtl.tasks, kept):
                self.log(f"fsmtl/kept/{task.name}", fraction, rank_zero_only=True)
            if record["churn"] is not None:
                for task, churn in zip(self.fsmtl.tasks, record["churn"]):
                    self.log(f"fsmtl/churn/{task.name}", churn, rank_zero_only=True)
            overlap = torch.tensor(record["overlap"], dtype=torch.float64)
            if overlap.shape[0] > 1:
                off_diagonal = overlap[~torch.eye(overlap.shape[0], dtype=torch.bool)]
                self.log("fsmtl/overlap/mean", float(off_diagonal.mean()), rank_zero_only=True)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        losses = list(self.task_losses(batch, batch_idx))
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.fsmtl.backward(losses)
        if world() is not None:
            self._average_gradients()
        self.fsmtl.before_optimizer_step()
        optimizer.step()
        self.fsmtl.after_optimizer_step()
        total = torch.stack([loss.detach() for loss in losses]).sum()
        for task, loss in zip(self.fsmtl.tasks, losses):
            self.log(f"loss/{task.name}", loss.detach(), on_step=True, on_epoch=True, sync_dist=True)
        return total

    def _average_gradients(self) -> None:
        """One all-reduce of every gradient, divided by the world size (DistributedSampler gives
        every rank a batch of the same size)."""
        params = [p for p in self.parameters() if p.grad is not None]
        if not params:
            return
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        dist.all_reduce(flat)
        flat.div_(dist.get_world_size())
        offset = 0
        for p in params:
            n = p.grad.numel()
            p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
            offset += n

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[CHECKPOINT_KEY] = self.fsmtl.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if CHECKPOINT_KEY not in checkpoint:
            raise ValueError(
                f"the checkpoint has no {CHECKPOINT_KEY!r} entry: it was not written by an FSMTLModule, so its masks "
                "cannot be restored"
            )
        self.fsmtl.load_state_dict(checkpoint[CHECKPOINT_KEY])
