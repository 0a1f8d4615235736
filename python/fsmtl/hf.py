"""FSMTL in the Hugging Face ``Trainer``: :class:`FSMTLTrainer` (needs ``pip install transformers
accelerate``, or the extra ``fsmtl-kernels[hf]``).

The Hugging Face Trainer backpropagates one loss, and its callbacks only see the summed gradient;
FSMTL's masked average needs each task's loss. :class:`FSMTLTrainer` overrides ``training_step``
(the T task losses of a batch, then :meth:`fsmtl.FSMTL.backward`), recomputes the masks at every
epoch's start (or step, with a step schedule) when the schedule says so, saves the FSMTL state in
every checkpoint folder (``fsmtl.pt``) and restores it when training resumes from one. The model
is the :class:`~fsmtl.MultiTaskModel` of the :class:`~fsmtl.FSMTL` object (its trunk may be any
``transformers`` model, see :mod:`fsmtl.models`).

What it refuses, each before training with the reason: gradient accumulation (the masked backward
writes the step's gradient, it does not add to it), fp16 with a loss scaler (bf16 is fine), several
processes (use :class:`fsmtl.Trainer` or :mod:`fsmtl.lightning` for data-parallel training), and
``remove_unused_columns=True`` (the columns are the task losses' inputs, not the model's forward
arguments).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch

try:
    import transformers
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
except ImportError as exc:  # an optional extra: say how to get it
    raise ImportError(
        "fsmtl.hf needs Hugging Face transformers and accelerate: pip install transformers accelerate (or pip install "
        '"fsmtl-kernels[hf]")'
    ) from exc

from .collectives import world
from .files import atomic_write_bytes
from .sparse_training import FSMTL

#: The file of the FSMTL state in a checkpoint folder.
STATE_FILE = "fsmtl.pt"


class FSMTLTrainer(transformers.Trainer):
    """A Hugging Face ``Trainer`` whose update is FSMTL's masked multi-task average.

    Args:
        fsmtl: the :class:`~fsmtl.FSMTL` object; ``model`` defaults to its model.
        task_losses: ``task_losses(model, batch) -> [loss_1, ..., loss_T]``, the T scalar task
            losses of a collated batch.
        fisher_data: where mask updates draw their Fisher samples (any form
            :meth:`fsmtl.FSMTL.update_masks` takes, e.g. a :class:`~fsmtl.data.Split` or a function
            ``sample(t, n)``).
        Other arguments as ``transformers.Trainer``.
    """

    def __init__(
        self,
        *args,
        fsmtl: FSMTL,
        task_losses: Callable[[torch.nn.Module, dict], Sequence[torch.Tensor]],
        fisher_data,
        **kwargs,
    ) -> None:
        if not isinstance(fsmtl, FSMTL):
            raise TypeError(f"fsmtl must be a fsmtl.FSMTL, got {type(fsmtl).__name__}")
        if not callable(task_losses):
            raise TypeError("task_losses must be a function task_losses(model, batch) -> list of T losses")
        if "model" not in kwargs and not args:
            kwargs["model"] = fsmtl.model
        super().__init__(*args, **kwargs)
        if self.model is not fsmtl.model:
            raise ValueError("the Trainer's model must be the FSMTL object's model (fsmtl.model)")
        a = self.args
        problems = []
        if a.gradient_accumulation_steps != 1:
            problems.append(f"gradient_accumulation_steps={a.gradient_accumulation_steps} (must be 1)")
        if a.fp16:
            problems.append("fp16=True (use bf16: the masked backward does not scale losses)")
        if a.remove_unused_columns:
            problems.append("remove_unused_columns=True (pass False: the columns feed task_losses)")
        if world() is not None or a.world_size > 1 or a.n_gpu > 1:
            problems.append("several processes or GPUs (use fsmtl.Trainer or fsmtl.lightning for data parallelism)")
        if problems:
            raise ValueError("FSMTLTrainer cannot train with " + "; ".join(problems))
        self.fsmtl = fsmtl
        self.task_losses = task_losses
        self.fisher_data = fisher_data
        self.add_callback(_Schedule(self))

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        model.train()
        with self.compute_loss_context_manager():
            losses = list(self.task_losses(model, inputs))
        self.fsmtl.backward([loss.float() for loss in losses])
        return torch.stack([loss.detach().float() for loss in losses]).sum()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The sum of the task losses (what evaluation reports as its loss)."""
        total = torch.stack([loss.float() for loss in self.task_losses(model, inputs)]).sum()
        return (total, None) if return_outputs else total

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        """As ``transformers.Trainer.train``; resuming from a checkpoint also restores the masks."""
        if resume_from_checkpoint:
            path = resume_from_checkpoint
            if path is True:
                path = get_last_checkpoint(self.args.output_dir)
                if path is None:
                    raise ValueError(f"resume_from_checkpoint=True: no checkpoint in {self.args.output_dir}")
            state_file = Path(path) / STATE_FILE
            if not state_file.is_file():
                raise FileNotFoundError(f"{path} has no {STATE_FILE}: not a checkpoint of an FSMTLTrainer")
            self.fsmtl.load_state_dict(torch.load(state_file, map_location="cpu", weights_only=True))
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)


class _Schedule(transformers.TrainerCallback):
    """The mask schedule and the FSMTL state in the Hugging Face training loop."""

    def __init__(self, owner: FSMTLTrainer) -> None:
        self.owner = owner

    def on_epoch_begin(self, args, state, control, **kwargs):
        fs = self.owner.fsmtl
        if fs.schedule.unit == "epoch":
            fs.update_masks(int(round(state.epoch or 0)), self.owner.fisher_data)

    def on_step_begin(self, args, state, control, **kwargs):
        fs = self.owner.fsmtl
        if fs.schedule.unit == "step":
            fs.update_masks(step=state.global_step, data=self.owner.fisher_data, epoch_start=False)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.owner.fsmtl.before_optimizer_step()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.owner.fsmtl.after_optimizer_step()

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if folder.is_dir():
            atomic_write_bytes(folder / STATE_FILE, lambda f: torch.save(self.owner.fsmtl.state_dict(), f))
