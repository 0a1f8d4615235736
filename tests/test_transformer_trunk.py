"""``--model transformer``: the attention trunk fits image and flat benchmarks, its Fisher is exact
with no fallback, and it trains with FS in the Trainer."""

from __future__ import annotations

import copy

import pytest
import torch

import fsmtl
from fsmtl.data import Benchmark, Split
from fsmtl.estimators import task_scores
from fsmtl.models import BACKBONES, TransformerTrunk, build_model
from fsmtl.tasks import Task
from fsmtl.tasks.losses import class_log_probs
from fsmtl_kernels.fisher_engine import fallback as fallback_mod


def benchmark(shape, n=24, tasks=None, seed=0) -> Benchmark:
    g = torch.Generator().manual_seed(seed)
    tasks = tasks or [Task("a", "binary", 1), Task("b", "multiclass", 3)]
    x = torch.randn(n, *shape, generator=g)
    targets = {
        "binary": lambda: torch.randint(0, 2, (n,), generator=g).float(),
        "multiclass": lambda: torch.randint(0, 3, (n,), generator=g),
        "segmentation": lambda: torch.randint(0, 2, (n, *shape[1:]), generator=g),
    }
    ys = [targets[t.kind]() for t in tasks]
    split = Split([x] * len(tasks), ys)
    return Benchmark(name="toy", tasks=tasks, homogeneous=True, input_shape=shape, train=split, val=split, test=split)


@pytest.mark.parametrize(
    ("shape", "tokens"), [((3, 16, 16), 16), ((1, 8, 8), 16), ((3, 6, 10), 15), ((20,), 5), ((7,), 7)]
)
def test_builds_on_images_and_flat_inputs(shape, tokens):
    assert "transformer" in BACKBONES
    model = build_model(benchmark(shape), backbone="transformer", hidden=32)
    assert isinstance(model.trunk, TransformerTrunk) and model.trunk.out_features == 32
    assert model.trunk.pos.shape == (1, tokens + 1, 32)
    x = torch.randn(5, *shape)
    assert model(x, 1).shape == (5, 3)


def test_refuses_what_it_cannot_fit():
    with pytest.raises(ValueError, match="per-pixel"):
        seg = [Task("s", "segmentation", 2)]
        build_model(benchmark((3, 8, 8), tasks=seg), backbone="transformer")
    with pytest.raises(ValueError, match="multiple of patch"):
        TransformerTrunk((3, 10, 10), patch=4)
    with pytest.raises(ValueError, match="token_size"):
        TransformerTrunk((10,), token_size=4)
    with pytest.raises(ValueError, match="divide"):
        TransformerTrunk((8,), width=30, heads=4)


@pytest.mark.parametrize("shape", [(3, 8, 8), (12,)])
def test_fisher_scores_exact_without_fallback(shape, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a parameter took the fallback")

    monkeypatch.setattr(fallback_mod, "module_vmap", refuse)
    monkeypatch.setattr(fallback_mod, "graph_batched", refuse)
    torch.manual_seed(1)
    bench = benchmark(shape, n=7)
    model = build_model(bench, backbone="transformer", hidden=16).train()  # dropout on: estimated in eval
    x = bench.train.inputs[0]
    task = bench.tasks[1]
    ours = task_scores(model, 1, task, x, bench.train.targets[1], "fs")
    assert model.training
    m64 = copy.deepcopy(model).double().eval()
    params = m64.masked_parameters()
    ref = [torch.zeros_like(p) for p in params]
    for i in range(7):
        logp = class_log_probs(task, m64(x[i : i + 1].double(), 1))
        loss = -logp.gather(1, logp.argmax(1, keepdim=True)).sum()
        for r, g in zip(ref, torch.autograd.grad(loss, params), strict=True):
            r += g.square() / 7
    top = max(float(r.abs().max()) for r in ref)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a.double(), b, rtol=2e-4, atol=2e-4 * max(float(b.abs().max()), 1e-6 * top))


def test_trains_with_fs_in_the_trainer():
    torch.manual_seed(2)
    bench = benchmark((3, 8, 8), n=32)
    model = build_model(bench, backbone="transformer", hidden=16)
    strategy = fsmtl.FisherSparse(0.5, estimator="fs", samples=16, schedule=fsmtl.MaskSchedule(warmup=1, every=1))
    trainer = fsmtl.Trainer(model, bench.tasks, strategy, torch.optim.Adam(model.parameters(), 1e-3), homogeneous=True)
    trainer.fit(bench.train, epochs=2, batch_size=16)
    total = sum(p.numel() for p in model.masked_parameters())
    assert trainer.history["mask_updates"][0]["ones"] == [round(0.5 * total)] * 2
