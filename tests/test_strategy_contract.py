"""The strategy contract the engine relies on: a user's strategy that writes only ``backward``
trains with every other member at its declared default; the engine picks its step mode from
declared members alone; the progress display shows the phases the strategy declares."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fsmtl
from fsmtl.data import Split
from fsmtl.engine.steps import InTurnsStep, PlainStep, StreamedStep, step_mode
from fsmtl.gradients import dense_multitask_backward
from fsmtl.strategies import MaskSchedule, MethodOptions, Strategy, get_method
from fsmtl.tasks import Task

TASKS = [Task("a", "binary", 1), Task("b", "regression", 1)]


def model(seed=0):
    torch.manual_seed(seed)
    return fsmtl.MultiTaskModel(nn.Sequential(nn.Linear(5, 8), nn.ReLU()), [nn.Linear(8, 1) for _ in TASKS])


def split(n=32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 5, generator=g)
    return Split([x] * 2, [(x[:, 0] > 0).float(), x[:, 1]])


class Halves(Strategy):
    """A user's strategy: only ``backward`` (task 0 weighted 1/4, task 1 weighted 3/4)."""

    def backward(self, losses, record=None):
        dense_multitask_backward([0.5 * losses[0], 1.5 * losses[1]], self.context.model.shared_parameters())


def test_a_strategy_with_only_backward_trains_resumes_and_declares_defaults(tmp_path):
    strategy = Halves()
    assert (strategy.modulates_forward, strategy.in_turns, strategy.mask) == (False, False, None)
    assert strategy.forward_record() is None and strategy.phase == "training" and not strategy.streams_backward()
    with pytest.raises(RuntimeError, match="in turns"):
        strategy.backward_task(0, torch.zeros(()))
    with pytest.raises(RuntimeError, match="streams_backward"):
        strategy.open_backward_stream()
    m = model()
    trainer = fsmtl.Trainer(m, TASKS, strategy, torch.optim.SGD(m.parameters(), 0.1))
    before = [p.detach().clone() for p in m.parameters()]
    trainer.fit(split(), epochs=2, batch_size=8)
    assert all(not torch.equal(a, b) for a, b in zip(before, m.parameters()))
    trainer.save_checkpoint(tmp_path)
    fresh = model(seed=1)
    again = fsmtl.Trainer(fresh, TASKS, Halves(), torch.optim.SGD(fresh.parameters(), 0.1))
    assert again.resume(tmp_path) and all(torch.equal(a, b) for a, b in zip(fresh.parameters(), m.parameters()))


@pytest.mark.parametrize(
    "name, homogeneous, mask_forward, expected",
    [
        ("mtl", True, False, PlainStep),
        ("fs-avg", True, False, PlainStep),  # one shared trunk forward: all losses at once
        ("fs-avg", True, True, StreamedStep),  # separate masked forwards, each backwarded at once
        ("fs-avg", False, False, StreamedStep),  # heterogeneous tasks
        ("gradnorm", False, False, PlainStep),  # needs every loss first
        ("fs-turns", True, False, InTurnsStep),
        ("tr+gradnorm", True, False, PlainStep),
    ],
)
def test_the_step_mode_comes_from_declared_members(name, homogeneous, mask_forward, expected):
    m = model()
    strategy = get_method(name).build(MethodOptions(keep_ratio=0.5, mask_forward=mask_forward, samples=8,
                                                    schedule=MaskSchedule(0, 1)))  # fmt: skip
    data = split()
    if not homogeneous:
        data = Split([data.inputs[0], data.inputs[0].clone()], data.targets)
    trainer = fsmtl.Trainer(m, TASKS, strategy, torch.optim.SGD(m.parameters(), 0.1), homogeneous=homogeneous)
    trainer.fit(data, epochs=1, batch_size=8)  # binds and computes the first mask
    assert type(step_mode(trainer)) is expected


class Phases:
    def __init__(self):
        self.seen = []

    def update(self, n=1):
        pass

    def phase(self, name):
        if not self.seen or self.seen[-1] != name:
            self.seen.append(name)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("fs", ["warm-up", "mask update", "training", "mask update", "training"]),
        # MR roams from the end of the warm-up, one swap per step until each task has visited its
        # 8 units (4 held, 4 swaps), then its masks freeze: 4 roaming steps in epoch 1, none in epoch 2.
        ("mr", ["training"] + ["mask update", "training"] * 4),
        ("mtl", ["training"]),
    ],
)
def test_progress_phases_come_from_the_strategy(name, expected):
    """A sparse method warms up before its first mask; mask updates (and MR's roaming) show as
    their own phase: the strategy's ``updates_at`` and ``phase``, not the display's guess."""
    m = model()
    strategy = get_method(name).build(MethodOptions(keep_ratio=0.5, samples=8, schedule=MaskSchedule(1, 1)))
    trainer = fsmtl.Trainer(m, TASKS, strategy, torch.optim.SGD(m.parameters(), 0.1))
    progress = Phases()
    trainer.fit(split(), epochs=3, batch_size=8, progress=progress)
    assert progress.seen == expected
