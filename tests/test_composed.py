"""Composed methods (ARCH+WEIGHTING): every architecture with every weighting writes the update
computed here by hand on a 2-task toy, from each task's own gradient under its own modulated
forward; compositions that cannot work are refused before training with one line."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

import fsmtl
from fsmtl.strategies import (
    ARCHITECTURES,
    WEIGHTINGS,
    Composed,
    MaskSchedule,
    MethodOptions,
    TrainingContext,
    get_method,
)
from fsmtl.strategies.weighting.jacobian import AGGREGATORS
from fsmtl.tasks import Task
from fsmtl.tasks.losses import task_loss

TASKS = [Task("a", "regression", 1), Task("b", "regression", 1)]
MODULATED = [a for a in ARCHITECTURES if a != "shared"]


def toy(seed=0):
    torch.manual_seed(seed)
    trunk = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 6), nn.Tanh())
    return fsmtl.MultiTaskModel(trunk, [nn.Linear(6, 1) for _ in TASKS])


def batch(n=8):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 4, generator=g)
    return x, [x[:, 0] - x[:, 1], torch.sin(x[:, 2]) * 2.0]


def bound(name, model, x, ys):
    options = MethodOptions(keep_ratio=0.5, schedule=MaskSchedule(warmup=0, every=1))
    strategy = get_method(name).build(options)

    def sample(t, n):
        return x[:n], ys[t][:n]

    strategy.bind(TrainingContext(model, TASKS, sample, torch.Generator().manual_seed(3)))
    return strategy


def own_gradients(model, strategy, x, ys):
    """Per task, by hand: the task's loss on its own (modulated) forward, and its gradient w.r.t.
    the shared trunk, every head and the architecture's own parameters (SE's modules)."""
    shared, heads = model.shared_parameters(), model.head_parameters()
    arch = strategy.architecture.parameters()
    losses, grads = [], []
    for t, task in enumerate(TASKS):
        loss = task_loss(task, model(x, t), ys[t])
        g = torch.autograd.grad(loss, shared + heads + arch, allow_unused=True)
        g = [torch.zeros_like(p) if gi is None else gi for gi, p in zip(g, shared + heads + arch)]
        losses.append(loss.detach())
        grads.append((g[: len(shared)], g[len(shared) :]))
    return losses, grads


def flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def expected_update(weighting, strategy, model, x, ys, gradnorm_weights):
    """The shared-trunk update and the per-task factor of the task parameters, from each task's
    gradient computed by hand. Returns (shared gradient as one flat vector, [factor_t])."""
    losses, grads = own_gradients(model, strategy, x, ys)
    g = torch.stack([flat(shared) for shared, _ in grads])  # [2, P] Jacobian of the trunk
    w = strategy.weighting
    if weighting == "equal":
        return g.mean(0), [1.0, 1.0]
    if weighting == "gradnorm":  # the weights before the step's own weight update
        return (gradnorm_weights[:, None] * g).sum(0) / 2, gradnorm_weights.tolist()
    if weighting == "rlw":
        lam = w.last_weights
        return (lam[:, None] * g).sum(0), (2 * lam).tolist()
    if weighting == "mgda-ub":
        alpha = w.last_weights
        # The min-norm point of the two representation gradients in closed form, each divided by its
        # loss times its norm first (the authors' "loss+" normalisation, the default): both tasks'
        # losses through their own trunk outputs z_t (gradient 0 w.r.t. the other task's z).
        zs = []
        hook = model.trunk.register_forward_hook(lambda m, i, o: zs.append(o))
        outs = [task_loss(task, model(x, t), ys[t]) for t, task in enumerate(TASKS)]
        hook.remove()
        v = torch.stack([flat(torch.autograd.grad(loss, zs, materialize_grads=True)) for loss in outs])
        v = v / (v.norm(dim=1) * torch.stack([loss.detach() for loss in outs]))[:, None]
        a1 = ((v[1] - v[0]) @ v[1] / (v[0] - v[1]).square().sum()).clamp(0, 1)
        torch.testing.assert_close(alpha, torch.stack([a1, 1 - a1]), atol=5e-3, rtol=0)
        return (alpha[:, None] * g).sum(0), alpha.tolist()  # heads weighted by a_t, as the authors' code
    spec = AGGREGATORS[weighting]
    import torchjd.aggregation as agg

    aggregator = getattr(agg, spec.torchjd_class)(**{k: 2 if v is None else v for k, v in spec.kwargs.items()})
    torch.manual_seed(11)  # the same draw as the strategy's (RGW's random weights)
    combined = aggregator(g)
    if weighting == "mgda":  # also the 2-task min-norm point in closed form (torchjd solves it iteratively)
        a1 = ((g[1] - g[0]) @ g[1] / (g[0] - g[1]).square().sum()).clamp(0, 1)
        torch.testing.assert_close(combined, a1 * g[0] + (1 - a1) * g[1], atol=1e-3, rtol=1e-2)
    return combined, [1.0, 1.0]


@pytest.mark.parametrize("weighting", list(WEIGHTINGS))
@pytest.mark.parametrize("architecture", MODULATED)
def test_composed_update_is_the_hand_computed_one(architecture, weighting):
    name = f"{architecture}+{weighting}"
    method = get_method(name)
    missing = method.missing_packages()
    if missing:
        pytest.skip(f"{name} needs {missing}")
    model = toy().double()
    x, ys = batch()
    x, ys = x.double(), [y.double() for y in ys]
    strategy = bound(name, model, x, ys)
    assert isinstance(strategy, Composed) and method.label == f"{ARCHITECTURES[architecture].label}+" + (
        WEIGHTINGS[weighting].label
    )
    gradnorm_weights = torch.tensor([0.5, 1.5], dtype=torch.float64)
    if weighting == "gradnorm":
        strategy.weighting.weights = gradnorm_weights.clone()
    losses = [task_loss(task, model(x, t), ys[t]) for t, task in enumerate(TASKS)]
    model.zero_grad(set_to_none=True)
    for p in strategy.architecture.parameters():
        p.grad = None
    torch.manual_seed(11)
    strategy.backward(losses)
    got_shared = flat([p.grad if p.grad is not None else torch.zeros_like(p) for p in model.shared_parameters()])
    got_task = [p.grad if p.grad is not None else torch.zeros_like(p) for p in model.head_parameters()]
    got_arch = [p.grad if p.grad is not None else torch.zeros_like(p) for p in strategy.architecture.parameters()]
    expected_shared, factors = expected_update(weighting, strategy, model, x, ys, gradnorm_weights)
    torch.testing.assert_close(got_shared, expected_shared, atol=1e-10, rtol=1e-7)
    # Heads and the architecture's own parameters: each belongs to one task and gets that task's
    # gradient, weighted as the weighting weights the task (the other task's gradient there is 0).
    _, grads = own_gradients(model, strategy, x, ys)
    expected_task = [sum(f * own[i] for f, (_, own) in zip(factors, grads)) for i in range(len(grads[0][1]))]
    for got, expected in zip(got_task + got_arch, expected_task, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-7)
    # SE: 2 tasks x 2 modulation points x (fc1, fc2) x (weight, bias); TR and MR own no parameters.
    assert len(got_arch) == (16 if architecture == "se" else 0)


def test_plain_names_keep_their_meaning():
    """``se`` is SE with equal weights, ``gradnorm`` GradNorm on the shared trunk, ``mtl`` the
    shared trunk with equal weights: the same strategies their composed spellings build."""
    pairs = (("se", "se+equal"), ("tr", "tr+equal"), ("gradnorm", "shared+gradnorm"), ("mtl", "shared+equal"))
    for plain, composed in pairs:
        a, b = get_method(plain), get_method(composed)
        assert a.strategy is b.strategy and a.sparse == b.sparse and a.requires == b.requires
    assert get_method("mr+rlw").sparse and not get_method("se+mgda-ub").sparse


@pytest.mark.parametrize(
    "name, fragment",
    [
        ("fs+gradnorm", "'fs' is a method of its own, not an architecture (a sparse method"),
        ("tr+fs", "'fs' is a method of its own, not a weighting"),
        ("tr+mtl-turns", "'mtl-turns' is a method of its own, not a weighting"),
        ("xx+equal", "'xx' is not an architecture; the architectures are shared, se, tr, mr"),
        ("se+nope", "'nope' is not a weighting; the weightings are equal,"),
    ],
)
def test_compositions_that_cannot_work_are_refused_with_the_reason(name, fragment):
    with pytest.raises(ValueError, match="cannot compose") as info:
        get_method(name)
    assert fragment in str(info.value)
    with pytest.raises(ValueError, match="not a weighting of the shared parameters"):
        Composed(ARCHITECTURES["tr"].factory(MethodOptions(keep_ratio=0.5)), fsmtl.FisherSparse(0.5))


def test_a_refused_composition_stops_fsmtl_run_before_training(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "fsmtl", "run", "--methods", "mtl,fs+gradnorm", "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fsmtl: error: cannot compose 'fs+gradnorm'")
    assert not (tmp_path / "out" / "results.json").exists()


def test_a_composed_method_trains_checkpoints_and_resumes_bit_for_bit(tmp_path):
    """tr+gradnorm in the Trainer: the composed state (TR's masks, GradNorm's weights) is saved and
    restored, so 2 + 2 epochs equal 4."""
    x, ys = batch(n=32)
    split = fsmtl.data.Split([x] * 2, ys)

    def trainer():
        model = toy()
        strategy = get_method("mr+gradnorm").build(MethodOptions(keep_ratio=0.5, schedule=MaskSchedule(0, 1)))
        return fsmtl.Trainer(model, TASKS, strategy, torch.optim.Adam(model.parameters(), 1e-2), seed=4)

    once = trainer()
    once.fit(split, epochs=4, batch_size=8)
    first = trainer()
    first.fit(split, epochs=2, batch_size=8)
    first.save_checkpoint(tmp_path)
    second = trainer()
    assert second.resume(tmp_path)
    second.fit(split, epochs=2, batch_size=8)
    assert second.history["loss"] == once.history["loss"]
    for a, b in zip(once.model.parameters(), second.model.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(once.strategy.weighting.weights, second.strategy.weighting.weights)
    assert once.strategy.architecture.updates == second.strategy.architecture.updates > 0
