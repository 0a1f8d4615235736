"""The Trainer's state: everything the next step depends on, saved and restored so that a run
stopped at any step and resumed trains bit for bit as one that never stopped; and the replay of
an interrupted epoch's batch order."""

from __future__ import annotations

import copy
import random

import numpy as np
import torch

#: Bumped when the layout of :func:`trainer_state` changes: an older state is refused by name.
STATE_VERSION = 2


def rng_states() -> dict:
    """torch (CPU and, when initialized, CUDA), numpy and Python RNG states."""
    states = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def trainer_state(trainer) -> dict:
    """``Trainer.state_dict()``: model, optimizer, scheduler, grad scaler, strategy, every RNG
    stream, counters and history, as tensors and plain Python objects for ``torch.save``."""
    return {
        "version": STATE_VERSION,
        "model": copy.deepcopy(trainer.model.state_dict()),
        "optimizer": copy.deepcopy(trainer.optimizer.state_dict()),
        "scheduler": trainer.scheduler.state_dict() if trainer.scheduler is not None else None,
        "scaler": trainer.scaler.state_dict() if trainer.scaler is not None else None,
        "strategy": trainer.strategy.state_dict(),
        "rng": {
            "data": trainer.generator.get_state(),
            "strategy": trainer.strategy_generator.get_state(),
            "global": rng_states(),
            "epoch_start": copy.deepcopy(trainer.epoch_start_rng),
        },
        "counters": {
            "epoch": trainer.epoch,
            "epoch_step": trainer.epoch_step,
            "global_step": trainer.global_step,
            "epoch_totals": trainer.epoch_totals.clone(),
            "epoch_counted": trainer.epoch_counted,
        },
        "history": copy.deepcopy(trainer.history),
        "best_model": copy.deepcopy(trainer.best_model),
        "amp": trainer.amp,
        "tasks": [t.name for t in trainer.tasks],
    }


def restore_trainer_state(trainer, state: dict) -> None:
    """``Trainer.load_state_dict(state)``: the next ``fit`` continues where that one stopped."""
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        found = state.get("version") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"not a fsmtl Trainer state of version {STATE_VERSION} (found {found!r})")
    if state["tasks"] != [t.name for t in trainer.tasks]:
        names = [t.name for t in trainer.tasks]
        raise ValueError(f"the state is for tasks {state['tasks']}, this trainer has {names}")
    if state["amp"] != trainer.amp:
        raise ValueError(f"the state was trained with amp={state['amp']!r}, this trainer has amp={trainer.amp!r}")
    for name, mine in (("scheduler", trainer.scheduler), ("scaler", trainer.scaler)):
        if (state[name] is None) != (mine is None):
            raise ValueError(f"the state {'has' if state[name] is not None else 'has no'} {name}, this trainer not")
    trainer.model.load_state_dict(state["model"])
    trainer.optimizer.load_state_dict(state["optimizer"])
    if trainer.scheduler is not None:
        trainer.scheduler.load_state_dict(state["scheduler"])
    if trainer.scaler is not None:
        trainer.scaler.load_state_dict(state["scaler"])
    if not trainer.strategy_bound:
        trainer.bind_strategy(None)
    trainer.strategy.load_state_dict(state["strategy"])
    rng = state["rng"]
    trainer.generator.set_state(rng["data"])
    trainer.strategy_generator.set_state(rng["strategy"])
    set_rng_states(rng["global"])
    trainer.epoch_start_rng = copy.deepcopy(rng["epoch_start"])
    c = state["counters"]
    trainer.epoch, trainer.epoch_step, trainer.global_step = c["epoch"], c["epoch_step"], c["global_step"]
    trainer.epoch_totals = c["epoch_totals"].clone()
    trainer.epoch_counted = c["epoch_counted"]
    trainer.history = copy.deepcopy(state["history"])
    trainer.best_model = copy.deepcopy(state["best_model"])


def epoch_batches(trainer, source):
    """The current epoch's batches; a resumed epoch replays its start (the data generator and the
    global RNGs as they were when the epoch began) and skips the steps done."""
    if trainer.epoch_step == 0:
        trainer.epoch_start_rng = {"data": trainer.generator.get_state(), "global": rng_states()}
        return iter(source.epoch())
    now = {"data": trainer.generator.get_state(), "global": rng_states()}
    trainer.generator.set_state(trainer.epoch_start_rng["data"])
    set_rng_states(trainer.epoch_start_rng["global"])
    batches = iter(source.epoch())
    for _ in range(trainer.epoch_step):
        next(batches)
    trainer.generator.set_state(now["data"])
    set_rng_states(now["global"])
    return batches
