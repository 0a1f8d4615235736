"""The FSMTL method: masks, masked updates, estimators against slow loops, both data regimes."""

import pytest
import torch
from torch import nn

import fsmtl
import fsmtl_kernels as fk
from fsmtl.data import Split
from fsmtl.estimators import task_scores
from fsmtl.tasks import Task
from fsmtl.tasks.losses import class_log_probs, task_loss

TASKS = [Task("a", "binary", 1), Task("b", "multiclass", 3), Task("c", "regression", 1)]


def tiny_model(seed=0, in_features=5, hidden=6):
    torch.manual_seed(seed)
    trunk = nn.Sequential(nn.Linear(in_features, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh())
    heads = [nn.Linear(hidden, t.num_outputs) for t in TASKS]
    return fsmtl.MultiTaskModel(trunk, heads)


def tiny_data(n=24, seed=0, homogeneous=True):
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn(n, 5, generator=gen)]
    xs = xs * 3 if homogeneous else xs + [torch.randn(n + 5 * t, 5, generator=gen) for t in (1, 2)]
    targets = [
        (xs[0][:, 0] > 0).float(),
        torch.randint(0, 3, (xs[1].shape[0],), generator=gen),
        xs[2][:, 1] * 2.0,
    ]
    return Split(xs, targets)


def slow_scores(model, t, task, x, y, estimator):
    """One backward pass per sample (and per class for efs), in float64."""
    model = model.double().eval()
    params = model.masked_parameters()
    out = [torch.zeros_like(p) for p in params]
    n = x.shape[0]
    if estimator in ("grad2", "absgrad"):
        g = torch.autograd.grad(
            task_loss(task, model(x.double(), t), y.double() if y.is_floating_point() else y), params
        )
        return [gi**2 if estimator == "grad2" else gi.abs() for gi in g]
    for i in range(n):
        xi, yi = x[i : i + 1].double(), y[i : i + 1]
        yi = yi.double() if yi.is_floating_point() else yi
        terms = []
        if task.kind == "regression":
            terms = [(1.0, task_loss(task, model(xi, t), yi))]
        else:
            logp = class_log_probs(task, model(xi, t))[0]
            if estimator == "fs":
                terms = [(1.0, -logp[logp.argmax()])]
            else:
                terms = [(logp[c].exp().item(), -logp[c]) for c in range(logp.numel())]
        for w, loss in terms:
            for o, g in zip(out, torch.autograd.grad(loss, params, retain_graph=True)):
                o += w * g**2 / n
    return out


@pytest.mark.parametrize("estimator", ["fs", "efs", "grad2", "absgrad"])
@pytest.mark.parametrize("t", [0, 1, 2])
def test_estimators_match_slow_loop(estimator, t):
    model = tiny_model()
    data = tiny_data(n=9)
    x, y = data.inputs[t], data.targets[t]
    ours = task_scores(model, t, TASKS[t], x, y, estimator)
    ref = slow_scores(model, t, TASKS[t], x, y, estimator)
    for o, r in zip(ours, ref):
        assert o.dtype == torch.float32
        torch.testing.assert_close(o.double(), r, rtol=1e-4, atol=1e-7)


def test_compute_masks_exact_k_per_task():
    model = tiny_model()
    data = tiny_data()
    mask = fsmtl.compute_masks(model, TASKS, list(zip(data.inputs, data.targets)), 0.3)
    total = sum(p.numel() for p in model.masked_parameters())
    assert mask.num_tasks == 3
    assert mask.count().tolist() == [fk.resolve_k(0.3, total)] * 3


def test_per_task_gradients_batched_equals_loop():
    model = tiny_model()
    data = tiny_data()
    losses = [task_loss(task, model(x, t), y) for t, (task, x, y) in enumerate(zip(TASKS, data.inputs, data.targets))]
    params = model.shared_parameters()
    batched = fsmtl.per_task_gradients(losses, params, batched=True)
    looped = fsmtl.per_task_gradients(losses, params, batched=False)
    for a, b in zip(batched, looped):
        torch.testing.assert_close(a, b)


def train(strategy, *, steps_epochs=3, homogeneous=True, optimizer=None, seed=0):
    model = tiny_model(seed)
    opt = (optimizer or (lambda p: torch.optim.SGD(p, lr=0.1)))(model.parameters())
    trainer = fsmtl.Trainer(model, TASKS, strategy, opt, homogeneous=homogeneous, seed=seed)
    trainer.fit(tiny_data(homogeneous=homogeneous), epochs=steps_epochs, batch_size=8)
    return model, trainer


def test_all_ones_masks_equal_dense_mtl_step_for_step():
    dense, _ = train(fsmtl.EqualWeighting())
    full, trainer = train(fsmtl.FisherSparse(1.0, schedule=fsmtl.MaskSchedule(warmup=0), update="average"))
    assert trainer.strategy.mask.count().tolist() == [trainer.strategy.mask.num_entries] * 3
    for a, b in zip(dense.parameters(), full.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def empty_entry_strategy(**kwargs):
    """FS with an explicit mask where entry (0, 0) of the first trunk weight is in no task's mask."""

    class FixedMask(fsmtl.RandomSparse):
        def compute_mask(self):
            masks = [torch.ones((3, *p.shape), dtype=torch.bool) for p in self.context.model.masked_parameters()]
            masks[0][:, 0, 0] = False
            masks[0][1, 1, :] = False
            return fk.PackedMask.from_bool_stacked(masks)

    return FixedMask(0.5, schedule=fsmtl.MaskSchedule(warmup=0), **kwargs)


def test_unselected_entry_gets_zero_grad_and_sgd_leaves_it():
    model0 = tiny_model()
    before = model0.trunk[0].weight[0, 0].item()
    model, trainer = train(empty_entry_strategy())
    assert model.trunk[0].weight[0, 0].item() == before
    assert model.trunk[0].weight.grad[0, 0].item() == 0.0
    assert model.trunk[0].weight[0, 1].item() != tiny_model().trunk[0].weight[0, 1].item()


def test_momentum_moves_unselected_entries_unless_frozen():
    before = tiny_model().trunk[0].weight[0, 0].item()

    def momentum(p):
        return torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.01)

    moved, _ = train(empty_entry_strategy(), optimizer=momentum)
    assert moved.trunk[0].weight[0, 0].item() != before  # weight decay and momentum act on it
    frozen, _ = train(empty_entry_strategy(freeze_unselected=True), optimizer=momentum)
    assert frozen.trunk[0].weight[0, 0].item() == before


def test_mask_forward_ignores_entries_outside_the_mask():
    model, trainer = train(empty_entry_strategy(mask_forward=True), steps_epochs=1)
    x = torch.randn(4, 5)
    mask1 = trainer.strategy.forward_mask(1)
    out = model(x, 1, mask1)
    with torch.no_grad():
        model.trunk[0].weight[1, :] += 100.0  # row 1 is outside task 1's mask
    torch.testing.assert_close(model(x, 1, mask1), out)
    assert not torch.allclose(model(x, 0, trainer.strategy.forward_mask(0)), model(x, 0))  # entry (0,0) off
    exported = model.export_task(1, mask1)
    total = sum(p.numel() for p in model.trunk.parameters())
    assert fsmtl.count_nonzero_shared(exported) == total - 1 - 5  # (0,0) and row 1 are zeroed
    torch.testing.assert_close(exported(x), model(x, 1, mask1))


@pytest.mark.parametrize("homogeneous", [True, False])
@pytest.mark.parametrize("strategy_name", ["fs", "efs", "rs", "mtl"])
def test_training_runs_and_records_masks(homogeneous, strategy_name):
    schedule = fsmtl.MaskSchedule(warmup=1, every=1)
    strategy = {
        "fs": lambda: fsmtl.FisherSparse(0.5, schedule=schedule, samples=10),
        "efs": lambda: fsmtl.FisherSparse(0.5, estimator="efs", schedule=schedule, samples=10, mask_forward=True),
        "rs": lambda: fsmtl.RandomSparse(0.5, schedule=schedule, redraw=True),  # fixed masks: one update
        "mtl": fsmtl.EqualWeighting,
    }[strategy_name]()
    model, trainer = train(strategy, steps_epochs=3, homogeneous=homogeneous)
    history = trainer.history
    assert len(history["loss"]) == 3 and all(len(row) == 3 for row in history["loss"])
    if strategy_name != "mtl":
        updates = history["mask_updates"]
        assert [u["epoch"] for u in updates] == [1, 2]
        assert updates[0]["churn"] is None and len(updates[1]["churn"]) == 3
        assert all(0.0 <= c <= 1.0 for c in updates[1]["churn"])
        assert len(updates[1]["overlap"]) == 3 and updates[1]["overlap"][0][0] == 1.0
    metrics = trainer.evaluate(tiny_data(homogeneous=homogeneous, seed=1))
    assert set(metrics[0]) >= {"accuracy", "precision", "recall", "f1"}


def test_step_schedule_and_bad_arguments():
    with pytest.raises(ValueError, match="every"):
        fsmtl.MaskSchedule(every=0)
    with pytest.raises(ValueError, match="unit"):
        fsmtl.MaskSchedule(unit="batch")
    with pytest.raises(ValueError, match="keep_ratio"):
        fsmtl.FisherSparse(1.5)
    with pytest.raises(ValueError, match="estimator"):
        fsmtl.FisherSparse(0.5, estimator="fisher")
    with pytest.raises(ValueError, match="normalize"):
        fsmtl.RandomSparse(0.5, normalize="mean")
    with pytest.raises(ValueError, match="tasks"):
        fsmtl.Trainer(tiny_model(), TASKS[:2], fsmtl.EqualWeighting(), torch.optim.SGD(tiny_model().parameters(), 0.1))
    with pytest.raises(ValueError, match="masked_modules"):
        fsmtl.MultiTaskModel(nn.Linear(2, 2), [nn.Linear(2, 1)], masked_modules=["nope"])
    s = fsmtl.MaskSchedule(warmup=2, every=3, unit="step")
    assert [step for step in range(12) if s.due(0, step, False)] == [2, 5, 8, 11]


def test_masked_modules_subset_keeps_other_trunk_params_dense():
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh())
    model = fsmtl.MultiTaskModel(trunk, [nn.Linear(6, t.num_outputs) for t in TASKS], masked_modules=["2"])
    assert [p.shape for p in model.masked_parameters()] == [torch.Size([6, 6]), torch.Size([6])]
    assert len(model.dense_shared_parameters()) == 2
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    strategy = fsmtl.FisherSparse(0.2, schedule=fsmtl.MaskSchedule(warmup=0), samples=8)
    data = tiny_data()
    fsmtl.Trainer(model, TASKS, strategy, opt).fit(data, epochs=1, batch_size=8)
    assert strategy.mask.shapes == (torch.Size([6, 6]), torch.Size([6]))
    # One more step by hand: dense trunk params get the task mean, masked ones sum_t S_t g_t / T.
    losses = [task_loss(task, model(x, t), y) for t, (task, x, y) in enumerate(zip(TASKS, data.inputs, data.targets))]
    dense, masked = model.dense_shared_parameters(), model.masked_parameters()
    per_task = [torch.autograd.grad(loss, dense + masked, retain_graph=True) for loss in losses]
    model.zero_grad(set_to_none=True)
    strategy.backward(losses)
    for i, p in enumerate(dense):
        torch.testing.assert_close(p.grad, sum(g[i] for g in per_task) / 3)
    for i, (p, m) in enumerate(zip(masked, strategy.mask.to_bool_stacked())):
        expected = sum(torch.where(m[t], g[len(dense) + i], 0.0) for t, g in enumerate(per_task)) / 3
        torch.testing.assert_close(p.grad, expected)


def test_torchjd_mean_aggregator_equals_dense_mtl():
    aggregation = pytest.importorskip("torchjd.aggregation", reason="torchjd is not installed")
    from fsmtl.strategies import JacobianAggregation

    dense, _ = train(fsmtl.EqualWeighting())
    jd, _ = train(JacobianAggregation(aggregation.Mean()))
    for a, b in zip(dense.parameters(), jd.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="aggregator"):
        JacobianAggregation("gradnorm")


def mgda_direction(tasks, num_tasks):
    """MGDA's trunk update and the per-task trunk gradients it combines, on one batch."""
    pytest.importorskip("torchjd.aggregation", reason="torchjd is not installed")
    from fsmtl.strategies import JacobianAggregation, TrainingContext

    model = tiny_model(seed=3)
    data = tiny_data()
    losses = [task_loss(tk, model(x, t), y) for t, (tk, x, y) in enumerate(zip(TASKS, data.inputs, data.targets))]
    losses = losses[:num_tasks]
    shared = model.shared_parameters()
    grads = torch.stack(
        [torch.cat([g.flatten() for g in torch.autograd.grad(loss, shared, retain_graph=True)]) for loss in losses]
    )
    strategy = JacobianAggregation("mgda")
    strategy.bind(TrainingContext(model, TASKS, None, torch.Generator()))
    strategy.backward(losses)
    return torch.cat([p.grad.flatten() for p in shared]), grads


def test_mgda_is_the_min_norm_point_of_two_task_gradients():
    d, (g1, g2) = mgda_direction(TASKS, 2)
    # min over a in [0, 1] of |a g1 + (1 - a) g2|^2, in closed form (Sener & Koltun 2018, Alg. 1).
    alpha = ((g2 - g1) @ g2 / (g1 - g2).square().sum()).clamp(0, 1)
    assert 0 < alpha < 1  # an interior point: the test exercises the combination, not a vertex
    torch.testing.assert_close(d, alpha * g1 + (1 - alpha) * g2, rtol=1e-4, atol=1e-6)


def test_mgda_direction_does_not_increase_any_task_loss():
    d, grads = mgda_direction(TASKS, 3)
    # The min-norm point d of the hull satisfies <d, g_t> >= |d|^2 for every t (up to the solver's tolerance).
    assert (grads @ d >= d @ d * (1 - 1e-3)).all()
    assert d.norm() < grads.mean(0).norm()


def test_bool_forward_masks_equal_the_float_product():
    """mask_forward applies bool masks with torch.where; the earlier float path multiplied by a
    float copy of the mask. Losses and gradients must be the same, bit for bit."""
    from torch.func import functional_call

    model = tiny_model()
    data = tiny_data()
    gen = torch.Generator().manual_seed(1)
    masks = [torch.rand(p.shape, generator=gen) < 0.5 for p in model.masked_parameters()]
    names = [n for n, _ in model.trunk.named_parameters()]

    def losses(features):
        return [task_loss(t, head(features), y) for t, head, y in zip(TASKS, model.heads, data.targets)]

    x = data.inputs[0]
    old = losses(
        functional_call(
            model.trunk, {n: p * m.float() for n, p, m in zip(names, model.masked_parameters(), masks)}, (x,)
        )
    )
    new = losses(model.features(x, masks))
    for t, (a, b) in enumerate(zip(old, new)):
        assert torch.equal(a, b)
        params = model.masked_parameters() + list(model.heads[t].parameters())
        for ga, gb in zip(
            torch.autograd.grad(a, params, retain_graph=True), torch.autograd.grad(b, params, retain_graph=True)
        ):
            assert torch.equal(ga, gb)
    for p, m in zip(model.masked_parameters(), masks):
        (g,) = torch.autograd.grad(model.features(x, masks).sum(), [p], retain_graph=True)
        assert torch.equal(g[~m], torch.zeros_like(g[~m]))
