"""Every bad input raises a ValueError/TypeError naming the argument, and modifies nothing."""

import pytest
import torch

import fsmtl_kernels as fk


def snapshot(tensors):
    return [t.clone() for t in tensors]


def assert_unchanged(before, after):
    for b, a in zip(before, after):
        assert torch.equal(b, a)


def raises_naming(exc, name, fn):
    with pytest.raises(exc) as info:
        fn()
    assert name in str(info.value), f"message does not name {name!r}: {info.value}"


FISHER_CASES = [
    ("empty fisher", TypeError, "fisher", lambda f, g: fk.fisher_accumulate(f[0], g)),
    ("empty list", ValueError, "fisher", lambda f, g: fk.fisher_accumulate([], g)),
    ("length mismatch", ValueError, "grads", lambda f, g: fk.fisher_accumulate(f, g[:1])),
    ("integer grads", TypeError, "grads[1]", lambda f, g: fk.fisher_accumulate(f, [g[0], g[1].long()])),
    ("float64 fisher", TypeError, "fisher[0]", lambda f, g: fk.fisher_accumulate([f[0].double(), f[1]], g)),
    (
        "trailing shape differs",
        ValueError,
        "grads[1]",
        lambda f, g: fk.fisher_accumulate(f, [g[0], torch.ones(4, 2, 2)]),
    ),
    ("mixed sample counts", ValueError, "grads[1]", lambda f, g: fk.fisher_accumulate(f, [g[0], torch.ones(3, 2, 3)])),
    ("batch shape differs", ValueError, "grads[0]", lambda f, g: fk.fisher_accumulate(f, [torch.ones(4), g[1][0]])),
    ("bool scale", TypeError, "scale", lambda f, g: fk.fisher_accumulate(f, g, scale=True)),
    ("nan scale", ValueError, "scale", lambda f, g: fk.fisher_accumulate(f, g, scale=float("nan"))),
    ("meta device", ValueError, "grads", lambda f, g: fk.fisher_accumulate(f, [t.to("meta") for t in g])),
    ("unknown backend", ValueError, "backend", lambda f, g: fk.fisher_accumulate(f, g, backend="cuda")),
]


@pytest.mark.parametrize(("case", "exc", "name", "call"), FISHER_CASES, ids=[c[0] for c in FISHER_CASES])
def test_fisher_accumulate_rejects(case, exc, name, call):
    fisher = [torch.rand(3), torch.rand(2, 3)]
    grads = [torch.randn(4, 3), torch.randn(4, 2, 3)]
    before, before_g = snapshot(fisher), snapshot(grads)
    raises_naming(exc, name, lambda: call(fisher, grads))
    assert_unchanged(before, fisher)
    assert_unchanged(before_g, grads)


def nan_scores():
    return [torch.tensor([1.0, 2.0]), torch.tensor([float("nan")])]


TOPK_CASES = [
    ("nan score", ValueError, "scores[1]", lambda s: fk.topk_mask(nan_scores(), 1)),
    ("k too large", ValueError, "k", lambda s: fk.topk_mask(s, 6)),
    ("k negative", ValueError, "k", lambda s: fk.topk_mask(s, -1)),
    ("k bool", TypeError, "k", lambda s: fk.topk_mask(s, True)),
    ("k string", TypeError, "k", lambda s: fk.topk_mask(s, "3")),
    ("k None", TypeError, "k", lambda s: fk.topk_mask(s, None)),
    ("ratio zero", ValueError, "k", lambda s: fk.topk_mask(s, 0.0)),
    ("ratio above one", ValueError, "k", lambda s: fk.topk_mask(s, 1.5)),
    ("ratio nan", ValueError, "k", lambda s: fk.topk_mask(s, float("nan"))),
    ("k tensor", TypeError, "k", lambda s: fk.topk_mask(s, torch.tensor(2))),
    ("integer scores", TypeError, "scores[0]", lambda s: fk.topk_mask([s[0].long(), s[1]], 2)),
    ("float64 scores", TypeError, "scores[1]", lambda s: fk.topk_mask([s[0], s[1].double()], 2)),
    ("empty scores", ValueError, "scores", lambda s: fk.topk_mask([], 2)),
    ("tensor not list", TypeError, "scores", lambda s: fk.topk_mask(s[0], 2)),
    ("non-tensor item", TypeError, "scores[1]", lambda s: fk.topk_mask([s[0], [1.0]], 2)),
    ("devices differ", ValueError, "scores[1]", lambda s: fk.topk_mask([s[0], s[1].to("meta")], 2)),
    ("batched task count", ValueError, "scores[1]", lambda s: fk.topk_mask_batched([s[0][None], s[1].repeat(2, 1)], 1)),
    ("batched k list length", ValueError, "k", lambda s: fk.topk_mask_batched([x[None] for x in s], [1, 2])),
    ("batched k item", ValueError, "k[1]", lambda s: fk.topk_mask_batched([x.repeat(2, 1) for x in s], [1, 9])),
]


@pytest.mark.parametrize(("case", "exc", "name", "call"), TOPK_CASES, ids=[c[0] for c in TOPK_CASES])
def test_topk_rejects(case, exc, name, call):
    scores = [torch.tensor([3.0, 1.0]), torch.tensor([2.0, 0.0, 5.0])]
    before = snapshot(scores)
    raises_naming(exc, name, lambda: call(scores))
    assert_unchanged(before, scores)


def make_average_inputs():
    grads = [torch.randn(2, 3), torch.randn(2, 4, 2)]
    mask = fk.PackedMask.from_bool_stacked([torch.rand(2, 3) < 0.5, torch.rand(2, 4, 2) < 0.5])
    params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(4, 2))]
    for p in params:
        p.grad = torch.full_like(p, 7.0)
    return grads, mask, params


AVERAGE_CASES = [
    ("normalize", ValueError, "normalize", lambda g, m, p: fk.masked_grad_average(g, m, normalize="mean", params=p)),
    ("mask type", TypeError, "mask", lambda g, m, p: fk.masked_grad_average(g, m.to_bool_stacked(), params=p)),
    ("grads count", ValueError, "grads", lambda g, m, p: fk.masked_grad_average(g[:1], m, params=p[:1])),
    ("grads shape", ValueError, "grads[1]", lambda g, m, p: fk.masked_grad_average([g[0], g[1][:1]], m, params=p)),
    ("integer grads", TypeError, "grads[0]", lambda g, m, p: fk.masked_grad_average([g[0].long(), g[1]], m, params=p)),
    ("params count", ValueError, "params", lambda g, m, p: fk.masked_grad_average(g, m, params=p[:1])),
    (
        "params shape",
        ValueError,
        "params[1]",
        lambda g, m, p: fk.masked_grad_average(g, m, params=[p[0], torch.nn.Parameter(torch.zeros(8))]),
    ),
    ("mask device", ValueError, "mask", lambda g, m, p: fk.masked_grad_average(g, m.to("meta"), params=p)),
]


@pytest.mark.parametrize(("case", "exc", "name", "call"), AVERAGE_CASES, ids=[c[0] for c in AVERAGE_CASES])
def test_masked_average_rejects(case, exc, name, call):
    grads, mask, params = make_average_inputs()
    before_g, before_w = snapshot(grads), mask.words.clone()
    before_p = snapshot([p.grad for p in params])
    raises_naming(exc, name, lambda: call(grads, mask, params))
    assert_unchanged(before_g, grads)
    assert torch.equal(before_w, mask.words)
    assert_unchanged(before_p, [p.grad for p in params])


def test_fisher_topk_rejects_and_names_task():
    params = [torch.zeros(3), torch.zeros(2)]
    good = [torch.ones(3), torch.ones(2)]
    raises_naming(ValueError, "grads[1]", lambda: fk.fisher_topk_batched(params, [good, [torch.ones(3)]], 1))
    raises_naming(ValueError, "k", lambda: fk.fisher_topk(params, good, 6))
    raises_naming(TypeError, "params[0]", lambda: fk.fisher_topk([torch.zeros(3, dtype=torch.long)], [good[0]], 1))


def test_linear_fisher_rejects_and_keeps_buffers():
    g, a = torch.randn(4, 3), torch.randn(4, 5)
    w, b = torch.rand(3, 5), torch.rand(3)
    before = snapshot([w, b])
    raises_naming(ValueError, "weight_fisher", lambda: fk.linear_fisher(g, a, torch.zeros(5, 3), b))
    raises_naming(ValueError, "bias_fisher", lambda: fk.linear_fisher(g, a, w, torch.zeros(5)))
    raises_naming(ValueError, "inputs", lambda: fk.linear_fisher(g, a[:3], w, b))
    raises_naming(TypeError, "weight_fisher", lambda: fk.linear_fisher(g, a, w.double(), b))
    raises_naming(TypeError, "inputs", lambda: fk.linear_fisher(g, a.long(), w, b))
    assert_unchanged(before, [w, b])


def test_backend_errors(monkeypatch):
    monkeypatch.setenv("FSMTL_BACKEND", "nonsense")
    raises_naming(ValueError, "FSMTL_BACKEND", lambda: fk.topk_mask([torch.ones(2)], 1))
    monkeypatch.setenv("FSMTL_BACKEND", "reference")
    assert fk.topk_mask([torch.ones(2)], 1).count().tolist() == [1]
