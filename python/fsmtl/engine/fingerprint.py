"""The fingerprint of a training run: everything that decides what it computes, as named entries.

A :class:`~fsmtl.engine.Trainer` takes its fingerprint when it is built (:func:`trainer_fingerprint`:
the project version, the tasks, every model parameter's name, shape and dtype, the optimizer's
type and hyper-parameters, the scheduler's type, the strategy's type and settings, mixed
precision, the world size); ``fsmtl run`` adds its resolved settings and the global batch. Every
checkpoint and finished result carries it, and loading one compares it first
(:func:`check_same_run`): a state of another run is refused in one line that names each
differing entry, before anything is changed.

Entries are plain JSON values, so that a fingerprint reads the same from a checkpoint, a
``result.pt`` or ``run.json``.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import math

import torch

from .. import collectives

#: How many differing parameters a mismatch message names before it says "and N more".
_NAMED = 4


def project_version() -> str:
    """The installed fsmtl-kernels version (``"unknown"`` when it is not installed as a package)."""
    try:
        return importlib.metadata.version("fsmtl-kernels")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _plain(value):
    """``value`` as a JSON value when it is a plain setting (numbers, strings, their lists and
    tuples); None when it is not (tensors, modules, callables are state or structure, not settings)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, (list, tuple)):
        items = [_plain(v) for v in value]
        return None if any(i is None and v is not None for i, v in zip(items, value)) else items
    return None


def _settings(obj, prefix: str, depth: int = 2) -> dict:
    """The public plain-valued attributes of ``obj`` (and of the objects and dataclasses it holds,
    ``depth`` levels down) as ``{prefix.name: value}``."""
    out = {}
    fields = dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else getattr(obj, "__dict__", {})
    for name, value in sorted(fields.items()):
        if name.startswith("_"):
            continue
        plain = _plain(value)
        if plain is not None or value is None:
            out[f"{prefix}.{name}"] = plain
        elif depth > 0 and (dataclasses.is_dataclass(value) or hasattr(value, "__dict__")):
            if isinstance(value, (torch.Tensor, torch.nn.Module, torch.Generator)) or callable(value):
                continue
            out[f"{prefix}.{name}"] = type(value).__name__
            out.update(_settings(value, f"{prefix}.{name}", depth - 1))
    return out


def trainer_fingerprint(trainer) -> dict:
    """The fingerprint of ``trainer`` as built (see the module docstring)."""
    fp: dict = {
        "fsmtl version": project_version(),
        "tasks": [f"{t.name}:{t.kind}/{t.num_outputs}" for t in trainer.tasks],
        "homogeneous": trainer.homogeneous,
        "amp": trainer.amp,
        "world size": collectives.world_size(),
        "parallel": trainer.parallel,
    }
    for name, p in trainer.model.named_parameters():
        fp[f"parameter {name}"] = f"{'x'.join(map(str, p.shape)) or 'scalar'} {str(p.dtype).removeprefix('torch.')}"
    optimizer = trainer.optimizer
    fp["optimizer"] = type(optimizer).__name__
    for key, value in sorted(optimizer.defaults.items()):
        plain = _plain(value)
        if plain is not None or value is None:
            fp[f"optimizer {key}"] = plain
    fp["optimizer groups"] = [len(g["params"]) for g in optimizer.param_groups]
    scheduler = trainer.scheduler
    fp["scheduler"] = None if scheduler is None else type(scheduler).__name__
    fp["scheduler interval"] = trainer.scheduler_interval if scheduler is not None else None
    fp["strategy"] = type(trainer.strategy).__name__
    fp.update(_settings(trainer.strategy, "strategy"))
    return fp


def differences(saved: dict, mine: dict) -> list[str]:
    """One phrase per differing entry, ``"lr 0.01 (here 0.001)"``; parameters beyond the first few
    are counted, not named."""
    out, params = [], []
    for key in list(saved) + [k for k in mine if k not in saved]:
        a, b = saved.get(key, "absent"), mine.get(key, "absent")
        if a == b:
            continue
        phrase = f"{key} {_show(a)} (here {_show(b)})"
        (params if key.startswith("parameter ") else out).append(phrase)
    if len(params) > _NAMED:
        params = params[:_NAMED] + [f"and {len(params) - _NAMED} more parameter(s)"]
    return out + params


def _show(value) -> str:
    return value if isinstance(value, str) else repr(value)


def check_same_run(saved: dict | None, mine: dict, what: str) -> None:
    """Raise ``ValueError`` (one line) when fingerprint ``saved`` of ``what`` differs from ``mine``,
    naming each differing entry; a ``what`` without a fingerprint is refused as written by another
    version."""
    if not isinstance(saved, dict):
        raise ValueError(
            f"{what} has no run fingerprint (written by an older fsmtl version); it cannot be checked "
            "against this run, so it is not used"
        )
    diff = differences(saved, mine)
    if diff:
        raise ValueError(f"{what} is of another run: {'; '.join(diff)}")
