"""The Trainer's state: everything the next step depends on, saved and restored so that a run
stopped at any step and resumed trains bit for bit as one that never stopped; and the replay of
an interrupted epoch's batch order.

Restoring is transactional: :func:`restore_trainer_state` first compares the state's run
fingerprint (:mod:`fsmtl.engine.fingerprint`) and checks every part against the trainer (model
keys, shapes and dtypes, optimizer groups and per-parameter state, scheduler, grad scaler,
strategy, RNG streams, counters); only then does it change anything, and should a part still
fail to load (a strategy that refuses its state), everything already changed is put back, so
that on any error the trainer is exactly as before the call.
"""

from __future__ import annotations

import copy
import random

import numpy as np
import torch

from .fingerprint import check_same_run

#: Bumped when the layout of :func:`trainer_state` changes: an older state is refused by name.
#: 3: the run fingerprint and the global batch of the fit that wrote it.
STATE_VERSION = 3


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
        "fingerprint": copy.deepcopy(trainer.fingerprint),
        "global_batch": trainer.global_batch,
    }


def restore_trainer_state(trainer, state: dict) -> None:
    """``Trainer.load_state_dict(state)``: the next ``fit`` continues where that one stopped.
    Everything is checked before anything changes; on any error the trainer is as before."""
    check_trainer_state(trainer, state)
    backup = _Backup(trainer)
    try:
        _apply(trainer, state)
    except BaseException:
        backup.restore()
        raise


_KEYS = ("model", "optimizer", "scheduler", "scaler", "strategy", "rng", "counters", "history", "best_model")


def check_trainer_state(trainer, state) -> None:
    """Raise ``ValueError`` (one line) when ``state`` cannot be loaded into ``trainer`` exactly:
    another layout version, another run (fingerprint), or any part that does not fit."""
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        found = state.get("version") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"not a fsmtl Trainer state of version {STATE_VERSION} (found {found!r})")
    missing = [k for k in (*_KEYS, "tasks", "amp", "fingerprint", "global_batch") if k not in state]
    if missing:
        raise ValueError(f"the Trainer state lacks {missing}")
    if state["tasks"] != [t.name for t in trainer.tasks]:
        names = [t.name for t in trainer.tasks]
        raise ValueError(f"the state is for tasks {state['tasks']}, this trainer has {names}")
    check_same_run(state["fingerprint"], trainer.fingerprint, "the state")
    if state["amp"] != trainer.amp:
        raise ValueError(f"the state was trained with amp={state['amp']!r}, this trainer has amp={trainer.amp!r}")
    for name, mine in (("scheduler", trainer.scheduler), ("scaler", trainer.scaler)):
        if (state[name] is None) != (mine is None):
            raise ValueError(f"the state {'has' if state[name] is not None else 'has no'} {name}, this trainer not")
    _check_tensors(state["model"], trainer.model.state_dict(), "model")
    if state["best_model"] is not None:
        _check_tensors(state["best_model"], trainer.model.state_dict(), "best model")
    _check_optimizer(state["optimizer"], trainer.optimizer)
    for name, mine in (("scheduler", trainer.scheduler), ("scaler", trainer.scaler)):
        if mine is not None and (not isinstance(state[name], dict) or set(state[name]) != set(mine.state_dict())):
            found = sorted(state[name]) if isinstance(state[name], dict) else type(state[name]).__name__
            raise ValueError(f"the {name} state has keys {found}, this trainer's {name} {sorted(mine.state_dict())}")
    _check_strategy(state["strategy"], trainer.strategy)
    rng = state["rng"]
    if not isinstance(rng, dict) or not {"data", "strategy", "global", "epoch_start"} <= set(rng):
        raise ValueError("the state's RNG streams are incomplete")
    for name, generator in (("data", trainer.generator), ("strategy", trainer.strategy_generator)):
        mine = generator.get_state()
        if not isinstance(rng[name], torch.Tensor) or rng[name].shape != mine.shape or rng[name].dtype != mine.dtype:
            raise ValueError(f"the state's {name} generator state is not a torch.Generator state")
    if not isinstance(rng["global"], dict) or not {"torch", "numpy", "python"} <= set(rng["global"]):
        raise ValueError("the state's global RNG states are incomplete")
    counters = state["counters"]
    for name in ("epoch", "epoch_step", "global_step", "epoch_counted"):
        value = counters.get(name) if isinstance(counters, dict) else None
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"the state's counter {name} is {value!r}, not a count")
    totals = counters["epoch_totals"]
    if not isinstance(totals, torch.Tensor) or totals.shape != (len(trainer.tasks),):
        raise ValueError(f"the state's epoch_totals is not one number per task ({len(trainer.tasks)})")
    if not isinstance(state["history"], dict) or not {"loss", "val", "mask_updates"} <= set(state["history"]):
        raise ValueError("the state's history is incomplete")


def _check_tensors(saved, mine: dict, what: str) -> None:
    """Same keys, shapes and dtypes; the message names the first few differences."""
    if not isinstance(saved, dict):
        raise ValueError(f"the {what} state is a {type(saved).__name__}, not a state dict")
    problems = [f"{k} missing" for k in mine if k not in saved]
    problems += [f"{k} unexpected" for k in saved if k not in mine]
    for k, v in mine.items():
        s = saved.get(k)
        if k not in saved:
            continue
        if not isinstance(s, torch.Tensor):
            problems.append(f"{k} is a {type(s).__name__}")
        elif s.shape != v.shape or s.dtype != v.dtype:
            problems.append(f"{k} is {list(s.shape)} {s.dtype}, this model's {list(v.shape)} {v.dtype}")
    if problems:
        more = f" and {len(problems) - 4} more" if len(problems) > 4 else ""
        raise ValueError(f"the {what} state does not fit this model: {'; '.join(problems[:4])}{more}")


def _check_optimizer(saved, optimizer) -> None:
    """Same parameter groups (count and sizes) and per-parameter state of the parameters' shapes."""
    if not isinstance(saved, dict) or not isinstance(saved.get("param_groups"), list) or "state" not in saved:
        raise ValueError("the optimizer state is not an optimizer state dict")
    groups = optimizer.param_groups
    sizes = [len(g["params"]) for g in groups]
    found = [len(g.get("params", ())) if isinstance(g, dict) else None for g in saved["param_groups"]]
    if found != sizes:
        raise ValueError(f"the optimizer state has parameter groups of {found} tensors, this optimizer {sizes}")
    params = [p for g in groups for p in g["params"]]
    ids = [i for g in saved["param_groups"] for i in g["params"]]
    where = dict(zip(ids, params))
    for key, per_param in saved["state"].items():
        p = where.get(key)
        if p is None or not isinstance(per_param, dict):
            raise ValueError(f"the optimizer state holds state for parameter {key!r}, which no group holds")
        for name, value in per_param.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != p.shape:
                raise ValueError(
                    f"the optimizer state's {name} of parameter {key} is {list(value.shape)}, "
                    f"the parameter is {list(p.shape)}"
                )


def _check_strategy(saved, strategy) -> None:
    if not isinstance(saved, dict):
        raise ValueError(f"the strategy state is a {type(saved).__name__}, not a dict")
    try:
        mine = strategy.state_dict()
    except RuntimeError:  # a strategy that needs to be bound to say what its state holds
        return
    if set(saved) != set(mine):
        raise ValueError(
            f"the strategy state has keys {sorted(saved)}, this trainer's {type(strategy).__name__} {sorted(mine)}"
        )


class _Backup:
    """What :func:`_apply` may change, to put back when a part fails to load."""

    def __init__(self, trainer) -> None:
        self.trainer = trainer
        self.model = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        self.optimizer = copy.deepcopy(trainer.optimizer.state_dict())
        self.scheduler = copy.deepcopy(trainer.scheduler.state_dict()) if trainer.scheduler is not None else None
        self.scaler = copy.deepcopy(trainer.scaler.state_dict()) if trainer.scaler is not None else None
        self.strategy = dict(trainer.strategy.__dict__)
        self.strategy_bound = trainer.strategy_bound
        # A bound strategy's parts may be changed in place (a generator's state, module weights):
        # its own state, to load back after its attributes.
        self.strategy_state = copy.deepcopy(trainer.strategy.state_dict()) if trainer.strategy_bound else None
        # Binding a strategy may register hooks on the model's modules: keep the hook tables too.
        self.hooks = [
            (table, dict(table))
            for module in trainer.model.modules()
            for name, table in vars(module).items()
            if name.endswith("_hooks") and isinstance(table, dict)
        ]
        self.generators = (trainer.generator.get_state(), trainer.strategy_generator.get_state())
        self.rng = rng_states()
        self.plain = {
            name: getattr(trainer, name)
            for name in ("epoch_start_rng", "epoch", "epoch_step", "global_step", "epoch_totals", "epoch_counted",
                         "history", "best_model", "global_batch")
        }  # fmt: skip

    def restore(self) -> None:
        t = self.trainer
        t.model.load_state_dict(self.model)
        t.optimizer.load_state_dict(self.optimizer)
        if t.scheduler is not None:
            t.scheduler.load_state_dict(self.scheduler)
        if t.scaler is not None:
            t.scaler.load_state_dict(self.scaler)
        t.strategy.__dict__.clear()
        t.strategy.__dict__.update(self.strategy)
        t.strategy_bound = self.strategy_bound
        if self.strategy_state is not None:
            t.strategy.load_state_dict(self.strategy_state)
        for table, entries in self.hooks:
            table.clear()
            table.update(entries)
        t.generator.set_state(self.generators[0])
        t.strategy_generator.set_state(self.generators[1])
        set_rng_states(self.rng)
        for name, value in self.plain.items():
            setattr(t, name, value)


def _apply(trainer, state: dict) -> None:
    if not trainer.strategy_bound:
        trainer.bind_strategy(None)
    trainer.strategy.load_state_dict(state["strategy"])  # first: the part most likely to refuse its state
    trainer.model.load_state_dict(state["model"])
    trainer.optimizer.load_state_dict(state["optimizer"])
    if trainer.scheduler is not None:
        trainer.scheduler.load_state_dict(state["scheduler"])
    if trainer.scaler is not None:
        trainer.scaler.load_state_dict(state["scaler"])
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
    trainer.global_batch = state["global_batch"]


def epoch_batches(trainer, source):
    """The current epoch's batches; a resumed epoch replays its start (the data generator and the
    global RNGs as they were when the epoch began) and skips the steps done. An epoch whose data
    yields no batch at all raises ``ValueError`` (an exhausted one-shot iterator, an empty
    loader): no loss is ever recorded for an epoch that trained nothing."""
    if trainer.epoch_step == 0:
        trainer.epoch_start_rng = {"data": trainer.generator.get_state(), "global": rng_states()}
        return _not_empty(iter(source.epoch()), trainer.epoch, 0)
    now = {"data": trainer.generator.get_state(), "global": rng_states()}
    trainer.generator.set_state(trainer.epoch_start_rng["data"])
    set_rng_states(trainer.epoch_start_rng["global"])
    batches = iter(source.epoch())
    for done in range(trainer.epoch_step):
        if next(batches, None) is None:
            raise ValueError(
                f"train: the checkpoint stopped epoch {trainer.epoch} after {trainer.epoch_step} steps, but the data "
                f"now yields only {done} batches in that epoch: it is not the data the run was trained on"
            )
    trainer.generator.set_state(now["data"])
    set_rng_states(now["global"])
    return _not_empty(batches, trainer.epoch, trainer.epoch_step)


def _not_empty(batches, epoch: int, skipped: int):
    """``batches``, raising at its end when it yielded nothing (and no step of the epoch was done)."""
    count = skipped
    for batch in batches:
        count += 1
        yield batch
    if count == 0:
        raise ValueError(
            f"train: epoch {epoch} yielded no batch (an iterator or generator is exhausted after one pass; "
            "pass a DataLoader, a Dataset or a list of batches, which can be iterated once per epoch)"
        )
