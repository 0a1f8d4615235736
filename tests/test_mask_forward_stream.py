"""The Trainer's streamed step: with separate task forwards under a mask (Eq. 3,
``mask_forward``; heterogeneous tasks) each task's forward is followed by its backward before the
next task's forward (one task graph alive), streamed into the masked sum by
:class:`fsmtl.MaskedBackwardStream`. Checked: the ``.grad`` of the reference formula in float64
and the same bits as the strategy's all-losses ``backward``; the call order; a non-finite loss
(last task) that changes no parameter, ``.grad`` or optimizer state; ``skip_nonfinite``; AMP."""

from __future__ import annotations

import contextlib
import copy
import weakref

import pytest
import torch
from torch import nn

import fsmtl
from fsmtl.strategies import MaskSchedule, RandomSparse
from fsmtl.strategies.sparse.base import SparseStrategy
from fsmtl.tasks import Task
from fsmtl.tasks.losses import task_loss

TASKS = [Task("a", "binary", 1), Task("b", "multiclass", 3), Task("c", "regression", 1)]
T = len(TASKS)
N = 10


def make_model(masked_modules=None, dtype=torch.float64):
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    heads = [nn.Linear(8, task.num_outputs) for task in TASKS]
    return fsmtl.MultiTaskModel(trunk, heads, masked_modules=masked_modules).to(dtype)


def make_batch(seed=0, dtype=torch.float64, heterogeneous=False):
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn(N, 5, generator=gen, dtype=dtype) for _ in range(T if heterogeneous else 1)]
    xs = xs if heterogeneous else xs * T
    ys = [  # float32 targets (the task kinds' dtype) for float64 models too
        (torch.rand(N, generator=gen) > 0.5).float(),
        torch.randint(0, 3, (N,), generator=gen),
        torch.randn(N, generator=gen),
    ]
    return xs, ys


def as_data(xs, ys, heterogeneous):
    """One step's batch as fit data: a list of (inputs, targets) or one batch list per task."""
    if heterogeneous:
        return [[(x, y)] for x, y in zip(xs, ys)]
    return [(xs[0], list(ys))]


def make_trainer(model, strategy, *, lr=0.0, heterogeneous=False, **kwargs):
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9 if lr else 0.0)
    return fsmtl.Trainer(model, TASKS, strategy, opt, homogeneous=not heterogeneous, seed=0, **kwargs)


def strategy(mask_forward=True, normalize="tasks", **kwargs):
    return RandomSparse(0.5, schedule=MaskSchedule(warmup=0, every=1), mask_forward=mask_forward,
                        normalize=normalize, **kwargs)  # fmt: skip


def reference_grads(model, mask, xs, ys, normalize, mask_forward):
    """Eq. 4 from T separate forward/backward passes (the trunk on ``S_t * theta`` spelled out
    with functional_call for Eq. 3): masked ``sum_t S_t g_t / T`` (or ``/ sum_t S_t``, 0 where no
    task holds the entry), dense trunk parameters the task average, heads their own task's gradient."""
    masked, dense, heads = model.masked_parameters(), model.dense_shared_parameters(), model.head_parameters()
    bools = mask.to_bool_stacked()
    every = masked + dense + heads
    sums = [torch.zeros_like(p) for p in every]
    for t, task in enumerate(TASKS):
        if mask_forward:
            weights = {n: p * b[t] for n, p, b in zip(model.masked_parameter_names(), masked, bools)}
            features = torch.func.functional_call(model.trunk, weights, (xs[t],))
        else:
            features = model.trunk(xs[t])
        loss = task_loss(task, model.heads[t](features), ys[t])
        grads = torch.autograd.grad(loss, every, allow_unused=True)
        for i, (s, g) in enumerate(zip(sums, grads)):
            if g is not None:
                s += g * bools[i][t] if i < len(masked) else g
    count = [b.sum(0) for b in bools]
    if normalize == "tasks":
        shared = [s / T for s in sums[: len(masked)]]
    else:
        shared = [torch.where(c > 0, s / c.clamp_min(1), 0.0) for s, c in zip(sums, count)]
    return shared + [s / T for s in sums[len(masked) : len(masked) + len(dense)]] + sums[len(masked) + len(dense) :]


def all_losses_grads(trainer, xs, ys):
    """The step before streaming: every task's forward first, then ``strategy.backward`` on all T
    losses (T graphs alive)."""
    model, strat = trainer.model, trainer.strategy
    model.zero_grad(set_to_none=True)
    losses = [task_loss(task, model(xs[t], t, strat.forward_mask(t)), ys[t]).float() for t, task in enumerate(TASKS)]
    strat.backward(losses)
    every = model.masked_parameters() + model.dense_shared_parameters() + model.head_parameters()
    return [p.grad.clone() for p in every]


@pytest.mark.parametrize("normalize", ["tasks", "selected"])
@pytest.mark.parametrize("masked_modules", [None, ["2", "4"]], ids=["full", "top2"])
@pytest.mark.parametrize(
    "heterogeneous,mask_forward", [(False, True), (True, True), (True, False)], ids=["mf", "het-mf", "het"]
)
def test_streamed_step_matches_reference_and_the_all_losses_backward(
    normalize, masked_modules, heterogeneous, mask_forward
):
    model = make_model(masked_modules)
    xs, ys = make_batch(heterogeneous=heterogeneous)
    trainer = make_trainer(model, strategy(mask_forward, normalize), heterogeneous=heterogeneous)  # lr 0
    trainer.fit(as_data(xs, ys, heterogeneous), epochs=1)
    mask = trainer.strategy.mask
    assert mask is not None and trainer.global_step == 1
    if normalize == "selected":
        assert any(bool((b.sum(0) == 0).any()) for b in mask.to_bool_stacked())  # entries no task holds
    every = model.masked_parameters() + model.dense_shared_parameters() + model.head_parameters()
    got = [p.grad.clone() for p in every]
    assert all(g.dtype == torch.float64 for g in got)
    expected = reference_grads(model, mask, xs, ys, normalize, mask_forward)
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        torch.testing.assert_close(g, e, atol=1e-12, rtol=1e-10, msg=lambda m, i=i: f"param {i}: {m}")
    # The same bits as the strategy's backward over all T losses (the same passes, same order).
    for g, old in zip(got, all_losses_grads(trainer, xs, ys), strict=True):
        assert torch.equal(g, old)


def test_task_backward_runs_before_the_next_task_forward():
    """Order of events in a step: with a mask, F0 B0 F1 B1 F2 B2 (one task graph alive at a time);
    in the warm-up (no mask, one shared trunk forward) all forwards come first."""
    model = make_model()
    events = []
    for t, head in enumerate(model.heads):

        def on_forward(module, args, out, t=t):
            if out.requires_grad:  # not the probe's no-grad forward
                events.append(f"F{t}")
                out.register_hook(lambda grad, t=t: events.append(f"B{t}"))

        head.register_forward_hook(on_forward)
    xs, ys = make_batch()
    trainer = make_trainer(model, RandomSparse(0.5, schedule=MaskSchedule(warmup=1, every=1, unit="step"),
                                               mask_forward=True))  # fmt: skip
    trainer.fit(as_data(xs, ys, False) * 2, epochs=1)
    assert trainer.strategy.mask is not None and trainer.global_step == 2
    warmup, masked = events[: 2 * T], events[2 * T :]
    assert warmup[:T] == ["F0", "F1", "F2"] and sorted(warmup[T:]) == ["B0", "B1", "B2"]
    assert masked == ["F0", "B0", "F1", "B1", "F2", "B2"]


def test_one_task_graph_alive_at_a_time():
    """At each task's forward, the graphs of the earlier tasks are freed: a tensor saved for
    their backward (counted by saved-tensor hooks) is released before the next forward starts."""
    model = make_model()
    alive = []  # per forward of a head: how many saved tensors of earlier tasks are still alive
    saved = []

    class Saved:
        def __init__(self, t):
            self.t = t

    def pack(x):
        box = Saved(model.current_task)
        saved.append(weakref.ref(box))
        return (box, x)

    def unpack(packed):
        return packed[1]

    for t, head in enumerate(model.heads):

        def pre(module, args, t=t):
            alive.append(sum(1 for r in saved if r() is not None and r().t is not None and r().t < t))

        head.register_forward_pre_hook(pre)
    xs, ys = make_batch()
    trainer = make_trainer(model, strategy())
    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        trainer.fit(as_data(xs, ys, False), epochs=1)
    assert len(alive) == 2 * T  # the probe's no-grad forward of every head, then the T task forwards
    assert alive[T:] == [0] * T
    assert len(saved) > 0


def snapshot(trainer):
    return (
        [p.detach().clone() for p in trainer.model.parameters()],
        [None if p.grad is None else p.grad.clone() for p in trainer.model.parameters()],
        copy.deepcopy(trainer.optimizer.state_dict()),
    )


def assert_snapshot(a, b):
    for x, y in zip(a[0], b[0], strict=True):
        assert torch.equal(x, y)
    for x, y in zip(a[1], b[1], strict=True):
        assert (x is None and y is None) or torch.equal(x, y)
    sa, sb = a[2]["state"], b[2]["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k]["momentum_buffer"], sb[k]["momentum_buffer"])


def poisoned_batch():
    """A finite batch whose LAST task's squared error overflows to inf (float32)."""
    xs, ys = make_batch(seed=1, dtype=torch.float32)
    ys[-1] = torch.full_like(ys[-1], 3e38)
    return xs, ys


def test_nonfinite_loss_of_the_last_task_raises_and_changes_nothing():
    model = make_model(["2", "4"], dtype=torch.float32)
    trainer = make_trainer(model, strategy(), lr=0.1)
    xs, ys = make_batch(dtype=torch.float32)
    trainer.fit(as_data(xs, ys, False), epochs=1)  # one good streamed step: .grad and momentum exist
    before = snapshot(trainer)
    assert all(g is not None for g in before[1]) and before[2]["state"]
    with pytest.raises(FloatingPointError, match=r"task 'c' at epoch 1, step 1.*nothing was updated"):
        trainer.fit(as_data(*poisoned_batch(), False), epochs=1)
    assert_snapshot(before, snapshot(trainer))
    assert trainer.global_step == 1
    # The stream was closed: no hook is left on the masked parameters (a plain backward fills .grad).
    model.zero_grad(set_to_none=True)
    task_loss(TASKS[0], model(xs[0], 0), ys[0]).backward()
    assert all(p.grad is not None for p in model.masked_parameters())


def test_skip_nonfinite_skips_the_streamed_step_and_continues_as_without_it():
    xs, ys = make_batch(dtype=torch.float32)
    bad = poisoned_batch()
    good2 = make_batch(seed=2, dtype=torch.float32)
    skipping = make_trainer(make_model(dtype=torch.float32), strategy(), lr=0.1, skip_nonfinite=True)
    skipping.fit(as_data(xs, ys, False), epochs=1)
    before = snapshot(skipping)
    skipping.fit(as_data(*bad, False), epochs=1)
    assert skipping.history["skipped_nonfinite"] == 1
    assert_snapshot(before, snapshot(skipping))
    skipping.fit(as_data(*good2, False), epochs=1)
    clean = make_trainer(make_model(dtype=torch.float32), strategy(), lr=0.1)
    clean.fit(as_data(xs, ys, False), epochs=1)
    clean.fit(as_data(*good2, False), epochs=1)
    for a, b in zip(skipping.model.parameters(), clean.model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert skipping.history["loss"][0] == clean.history["loss"][0]
    assert skipping.history["loss"][2] == clean.history["loss"][1]


def no_stream(strat: SparseStrategy) -> SparseStrategy:
    """The same strategy, stepping as before streaming: all task forwards, then ``backward``."""
    strat.streams_backward = lambda: False
    return strat


@pytest.mark.parametrize("amp", ["bf16", "fp16", None])
def test_streamed_training_is_bit_identical_to_all_losses_backward(amp):
    """Several steps (momentum, mask redraws, BatchNorm, AMP on CPU): the streamed step trains the
    same bits as the all-losses step it replaces; and the gradients are real (AMP near float32)."""

    def run(streamed):
        torch.manual_seed(0)
        trunk = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh())
        model = fsmtl.MultiTaskModel(trunk, [nn.Linear(8, task.num_outputs) for task in TASKS], masked_modules=["3"])
        strat = RandomSparse(0.5, schedule=MaskSchedule(warmup=1, every=2, unit="step"), mask_forward=True, redraw=True)
        trainer = make_trainer(model, strat if streamed else no_stream(strat), lr=0.05, amp=amp)
        opened = []
        original = trainer.strategy.open_backward_stream
        trainer.strategy.open_backward_stream = lambda: opened.append(1) or original()
        batches = [as_data(*make_batch(seed=s, dtype=torch.float32), False)[0] for s in range(5)]
        trainer.fit(batches, epochs=2)
        return trainer, len(opened)

    streamed, opened = run(True)
    before, opened_before = run(False)
    assert opened == 9 and opened_before == 0  # 10 steps, step 0 in the warm-up (no mask: one shared forward)
    for a, b in zip(streamed.model.state_dict().values(), before.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert streamed.history["loss"] == before.history["loss"]
    assert streamed.history["skipped_amp"] == before.history["skipped_amp"]
    if amp is not None:  # the forward did run in reduced precision: the loss differs from float32's
        xs, ys = make_batch(seed=0, dtype=torch.float32)
        model = streamed.model
        grads = {}
        for precision in (amp, None):
            model.zero_grad(set_to_none=True)
            dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
            with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                loss = task_loss(TASKS[0], model(xs[0], 0, streamed.strategy.forward_mask(0)), ys[0])
            loss.float().backward()
            grads[precision] = model.masked_parameters()[0].grad.clone()
        assert not torch.equal(grads[amp], grads[None])
        torch.testing.assert_close(grads[amp], grads[None], atol=5e-2, rtol=5e-2)


def test_streamed_forwards_keep_the_masked_weights_and_give_the_same_grads(monkeypatch):
    """Inside ``streamed_forwards()`` a masked forward saves its masked weights as they are (no
    (parameter, mask) packing to rebuild in the backward); the gradients are the same bits."""
    from fsmtl import model as model_module

    packed = []
    original = model_module._SavedMasked.pack

    def counting_pack(self, t):
        out = original(self, t)
        packed.append(isinstance(out, tuple))
        return out

    monkeypatch.setattr(model_module._SavedMasked, "pack", counting_pack)
    model = make_model()
    xs, ys = make_batch()
    gen = torch.Generator().manual_seed(5)
    mask = [torch.rand(p.shape, generator=gen) < 0.5 for p in model.masked_parameters()]
    grads = {}
    for streamed in (False, True):
        packed.clear()
        model.zero_grad(set_to_none=True)
        with model.streamed_forwards() if streamed else contextlib.nullcontext():
            out = model(xs[0], 0, mask)
        assert any(packed) != streamed  # outside: the masked weights are packed as (p, mask)
        out.square().sum().backward()
        grads[streamed] = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    packed.clear()
    model(xs[0], 0, mask)
    assert any(packed)  # the context ended: masked forwards pack (p, mask) again
    for a, b in zip(grads[False], grads[True], strict=True):
        assert torch.equal(a, b)
