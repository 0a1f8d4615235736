"""The paper's peers written here: GradNorm, MGDA-UB, RLW (their defining behaviour)."""

import pytest
import torch
from torch import nn

import fsmtl
from fsmtl.data import Split
from fsmtl.strategies import METHODS, TrainingContext
from fsmtl.strategies.weighting.gradnorm import GradNorm
from fsmtl.strategies.weighting.mgda_ub import MGDAUB
from fsmtl.strategies.weighting.rlw import RandomLossWeighting
from fsmtl.tasks import Task
from fsmtl.tasks.losses import task_loss

TASKS = [Task("a", "binary", 1), Task("b", "regression", 1), Task("c", "multiclass", 3)]


def tiny(seed=0, hidden=6):
    torch.manual_seed(seed)
    trunk = nn.Sequential(nn.Linear(5, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh())
    return fsmtl.MultiTaskModel(trunk, [nn.Linear(hidden, t.num_outputs) for t in TASKS])


def batch(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g)
    return x, [(x[:, 0] > 0).float(), x[:, 1] * 3.0, torch.randint(0, 3, (n,), generator=g)]


def bound(strategy, model):
    strategy.bind(TrainingContext(model, TASKS, lambda t, n: None, torch.Generator().manual_seed(0)))
    return strategy


def losses_of(model, x, ys):
    z = model.features(x)
    return [task_loss(t, h(z), y) for t, h, y in zip(TASKS, model.heads, ys)]


def grads(model):
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]


def test_gradnorm_one_update_matches_a_hand_computed_step():
    model = tiny()
    x, ys = batch()
    s = bound(GradNorm(alpha=1.5, lr=0.1), model)
    assert s.layer == "2.weight"  # last shared layer
    s.weights = torch.tensor([0.5, 1.0, 1.5])
    s.initial_losses = torch.tensor([1.0, 2.0, 4.0])
    losses = losses_of(model, x, ys)
    L = torch.stack([v.detach() for v in losses])
    W = model.trunk[2].weight
    n = torch.stack([torch.autograd.grad(v, W, retain_graph=True)[0].norm() for v in losses])
    s.backward(losses)
    # By hand: G_t = w_t n_t; r_t = (L_t/L_t(0)) / mean; target = mean(G) r^alpha; one step, renormalise.
    w = torch.tensor([0.5, 1.0, 1.5])
    G = w * n
    r = (L / torch.tensor([1.0, 2.0, 4.0])) / (L / torch.tensor([1.0, 2.0, 4.0])).mean()
    target = G.mean() * r**1.5
    step = w - 0.1 * torch.sign(G - target) * n
    torch.testing.assert_close(s.weights, step * 3 / step.sum())
    assert not torch.allclose(s.weights, w)
    # The network update used the old weights: trunk 1/T sum w_t g_t, head t w_t g_t.
    got = grads(model)
    model.zero_grad(set_to_none=True)
    weighted = sum(wt * v for wt, v in zip(w, losses_of(model, x, ys)))
    torch.autograd.backward(weighted / 3, inputs=model.shared_parameters(), retain_graph=True)
    torch.autograd.backward(weighted, inputs=model.head_parameters())
    for a, b in zip(got, grads(model)):
        torch.testing.assert_close(a, b)


def test_gradnorm_first_step_sets_initial_losses_and_keeps_sum():
    model = tiny()
    x, ys = batch()
    s = bound(GradNorm(), model)
    s.backward(losses_of(model, x, ys))
    assert s.initial_losses is not None
    torch.testing.assert_close(s.weights.sum(), torch.tensor(3.0))
    restored = bound(GradNorm(), tiny())
    restored.load_state_dict(s.state_dict())
    assert torch.equal(restored.weights, s.weights) and torch.equal(restored.initial_losses, s.initial_losses)
    with pytest.raises(ValueError, match="layer 'nope'"):
        bound(GradNorm(layer="nope"), model)


def min_norm_2(g1, g2):
    """Sener and Koltun's closed-form min-norm point of two vectors (Algorithm 1)."""
    a = ((g2 - g1) @ g2 / ((g1 - g2) @ (g1 - g2))).clamp(0, 1)
    return torch.stack([a, 1 - a])


@pytest.mark.parametrize("heads", ["weighted", "unweighted"])
@pytest.mark.parametrize("normalization", ["loss+", "l2", "loss", "none"])
def test_mgda_ub_uses_representation_gradients(normalization, heads):
    """The min-norm weights of the normalised representation gradients (the authors'
    ``gradient_normalizers``), the trunk through Z with the raw gradients, heads a_t-weighted or not."""
    tasks = [Task("a", "binary", 1), Task("b", "binary", 1)]
    torch.manual_seed(1)
    trunk = nn.Sequential(nn.Linear(5, 6), nn.Tanh())
    model = fsmtl.MultiTaskModel(trunk, [nn.Linear(6, 1), nn.Linear(6, 1)])
    x, _ = batch()
    ys = [(x[:, 0] > 0).float(), 3.0 * (x[:, 1] > 0).float().clamp(max=1)]
    s = MGDAUB(normalization, heads, epsilon=1e-9, max_iters=10000)
    s.bind(TrainingContext(model, tasks, lambda t, n: None, torch.Generator()))
    z = model.features(x)
    losses = [task_loss(t, h(z), y) for t, h, y in zip(tasks, model.heads, ys)]
    gz = [torch.autograd.grad(v, z, retain_graph=True)[0] for v in losses]
    by = {
        "none": [1.0, 1.0],
        "l2": [g.norm() for g in gz],
        "loss": [float(v.detach()) for v in losses],
        "loss+": [float(v.detach()) * g.norm() for v, g in zip(losses, gz)],
    }[normalization]
    a = min_norm_2(gz[0].flatten() / by[0], gz[1].flatten() / by[1])
    s.backward(losses)
    assert 0.05 < a[0] < 0.95  # an interior min-norm point
    torch.testing.assert_close(s.last_weights, a, atol=1e-4, rtol=1e-4)
    got = grads(model)
    # Expected trunk gradient: back through Z with a_1 dL1/dZ + a_2 dL2/dZ; heads a_t dL_t or dL_t.
    model.zero_grad(set_to_none=True)
    z = model.features(x)
    losses = [task_loss(t, h(z), y) for t, h, y in zip(tasks, model.heads, ys)]
    params = model.shared_parameters()
    gp = [torch.cat([g.flatten() for g in torch.autograd.grad(v, params, retain_graph=True)]) for v in losses]
    w = a if heads == "weighted" else torch.ones(2)
    torch.autograd.backward(w[0] * losses[0] + w[1] * losses[1], inputs=model.head_parameters(), retain_graph=True)
    torch.autograd.backward(z, a[0] * gz[0] + a[1] * gz[1], inputs=params)
    for g, e in zip(got, grads(model)):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-4)
    # ... which is not MGDA on the parameter gradients (the min-norm weights differ).
    assert not torch.allclose(min_norm_2(*gp), a, atol=1e-3)


def test_mgda_ub_defaults_are_the_authors_and_bad_choices_are_named():
    s = METHODS["mgda-ub"].build()
    assert (s.normalization, s.heads) == ("loss+", "weighted")
    with pytest.raises(ValueError, match="normalization must be one of"):
        MGDAUB("l1")
    with pytest.raises(ValueError, match="heads must be one of"):
        MGDAUB(heads="half")


def test_mgda_ub_trains_in_the_trainer():
    model = tiny()
    x, ys = batch(32)
    split = Split([x] * 3, ys)
    s = METHODS["mgda-ub"].build()
    trainer = fsmtl.Trainer(model, TASKS, s, torch.optim.SGD(model.parameters(), 0.1))
    history = trainer.fit(split, epochs=3, batch_size=16)
    assert history["loss"][-1][1] < history["loss"][0][1]
    assert s.last_weights.shape == (3,) and abs(float(s.last_weights.sum()) - 1) < 1e-5


@pytest.mark.parametrize("distribution", ["normal", "dirichlet"])
def test_rlw_draws_new_simplex_weights_each_step(distribution):
    model = tiny()
    x, ys = batch()
    s = bound(RandomLossWeighting(distribution), model)
    torch.manual_seed(0)
    drawn = []
    for _ in range(3):
        model.zero_grad(set_to_none=True)
        losses = losses_of(model, x, ys)
        s.backward(losses)
        w = s.last_weights
        drawn.append(w)
        assert (w > 0).all() and abs(float(w.sum()) - 1) < 1e-6
        got = grads(model)
        model.zero_grad(set_to_none=True)
        weighted = sum(wt * v for wt, v in zip(w, losses_of(model, x, ys)))
        torch.autograd.backward(weighted, inputs=model.shared_parameters(), retain_graph=True)
        torch.autograd.backward(3 * weighted, inputs=model.head_parameters())
        for a, b in zip(got, grads(model)):
            torch.testing.assert_close(a, b)
    assert not torch.allclose(drawn[0], drawn[1]) and not torch.allclose(drawn[1], drawn[2])
    with pytest.raises(ValueError, match="distribution"):
        RandomLossWeighting("uniform")


def test_rlw_dirichlet_mean_is_uniform():
    s = bound(RandomLossWeighting("dirichlet"), tiny())
    w = torch.stack([s.draw(torch.zeros(4)) for _ in range(4000)])
    torch.testing.assert_close(w.mean(0), torch.full((4,), 0.25), atol=0.01, rtol=0)
    # Dir(1,1,1,1): Var = (1/4)(3/4)/5
    torch.testing.assert_close(w.var(0), torch.full((4,), 0.0375), atol=0.004, rtol=0)
