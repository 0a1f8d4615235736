"""Each variant's defining behaviour: fixed vs redrawn RS masks, tasks updated in turns, Fisher on the
task's masked network, per-layer keep ratio, STL with Fisher-sparse updates."""

import copy
from types import SimpleNamespace

import pytest
import torch

import fsmtl
from fsmtl.data import load_benchmark
from fsmtl.estimators import task_scores
from fsmtl.models import build_model
from fsmtl.run.experiment import ExperimentConfig, run_experiment
from fsmtl.strategies import METHODS, MaskSchedule, MethodOptions
from fsmtl.strategies.sparse.fisher import FisherSparse
from fsmtl.strategies.sparse.random import RandomSparse
from fsmtl.strategies.sparse.variants import masked_network_scores, per_layer_topk, task_masks
from fsmtl.tasks.losses import task_loss


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("synthetic", n_samples=200, n_tasks=3)


def _trainer(bench, strategy, optimizer=None, seed=0):
    torch.manual_seed(seed)
    model = build_model(bench, hidden=16)
    optimizer = optimizer(model) if optimizer is not None else torch.optim.Adam(model.parameters(), 1e-2)
    return fsmtl.Trainer(model, bench.tasks, strategy, optimizer, homogeneous=bench.homogeneous, seed=seed)


def _masks(strategy):
    return [m.clone() for m in strategy.mask.to_bool_stacked()]


@pytest.mark.parametrize("redraw", [False, True])
def test_random_masks_fixed_by_default_redrawn_as_option(bench, redraw):
    strategy = RandomSparse(0.3, redraw=redraw, schedule=MaskSchedule(warmup=0, every=1))
    trainer = _trainer(bench, strategy)
    trainer.fit(bench.train, epochs=1, batch_size=32)
    first = _masks(strategy)
    before = [p.detach().clone() for p in trainer.model.masked_parameters()]
    trainer.fit(bench.train, epochs=2, batch_size=32)
    same = all(torch.equal(a, b) for a, b in zip(first, _masks(strategy)))
    assert len(trainer.history["mask_updates"]) == (3 if redraw else 1)
    assert same is not redraw
    if not redraw:  # entries outside every fixed mask never move (Adam without weight decay: zero grad)
        unselected = [~m.any(0) for m in first]
        after = trainer.model.masked_parameters()
        assert all(torch.equal(b[u], a.detach()[u]) for b, a, u in zip(before, after, unselected))
    assert METHODS["rs"].build(MethodOptions(keep_ratio=0.3)).redraw is False
    assert METHODS["rs-redraw"].build(MethodOptions(keep_ratio=0.3)).redraw is True


def test_in_turns_makes_one_optimizer_update_per_task_and_step(bench):
    strategy = METHODS["fs-turns"].build(
        MethodOptions(keep_ratio=0.3, schedule=MaskSchedule(warmup=0, every=1), samples=16)
    )
    trainer = _trainer(bench, strategy)
    steps = []
    trainer.optimizer.step = _counting(trainer.optimizer.step, steps)
    trainer.fit(bench.train, epochs=1, batch_size=40)
    assert len(steps) == len(bench.tasks) * trainer.global_step == 3 * 3  # 120 examples / 40 per step
    mean = _trainer(bench, METHODS["fs-avg"].build(MethodOptions(keep_ratio=0.3, schedule=MaskSchedule(0, 1))))
    counted = []
    mean.optimizer.step = _counting(mean.optimizer.step, counted)
    mean.fit(bench.train, epochs=1, batch_size=40)
    assert len(counted) == mean.global_step == 3


def test_fs_follows_the_paper_in_turns_on_homogeneous_tasks_and_averages_on_heterogeneous_ones(bench):
    """Plain ``fs`` (and every estimator) updates homogeneous tasks in turns, with the same updates as
    ``fs-turns``; a context whose tasks have their own inputs gets the averaged update."""
    options = MethodOptions(keep_ratio=0.3, schedule=MaskSchedule(warmup=0, every=1), samples=16)
    runs = {}
    for name in ("fs", "fs-turns"):
        trainer = _trainer(bench, METHODS[name].build(options))
        steps = []
        trainer.optimizer.step = _counting(trainer.optimizer.step, steps)
        trainer.fit(bench.train, epochs=1, batch_size=40)
        assert len(steps) == len(bench.tasks) * trainer.global_step
        runs[name] = [p.detach().clone() for p in trainer.model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(runs["fs"], runs["fs-turns"]))
    for name in ("fs", "efs", "grad2", "absgrad"):
        strategy = METHODS[name].build(options)
        assert strategy.update == "paper" and strategy.in_turns
        strategy.context = SimpleNamespace(homogeneous=False)
        assert not strategy.in_turns
    assert not METHODS["fs-avg"].build(options).in_turns and not METHODS["stl-fs"].build(options).in_turns
    turns = METHODS["fs-turns"].build(options)
    turns.context = SimpleNamespace(homogeneous=False)
    assert turns.in_turns
    with pytest.raises(ValueError, match="update must be one of"):
        FisherSparse(0.3, update="sometimes")


def _counting(step, calls):
    def counted(*args, **kwargs):
        calls.append(1)
        return step(*args, **kwargs)

    return counted


def test_in_turns_recomputes_each_task_loss_after_the_previous_update(bench):
    """One in-turns step with SGD equals theta <- theta - lr * grad L_t(theta), t = 0, 1, 2 in order,
    each loss at the parameters the previous update left."""
    lr = 0.1

    def sgd(model):
        return torch.optim.SGD(model.parameters(), lr)

    trainer = _trainer(bench, METHODS["mtl-turns"].build(), optimizer=sgd)
    reference = copy.deepcopy(trainer.model)
    x = bench.train.inputs[0][:32]
    ys = [y[:32] for y in bench.train.targets]
    trainer.fit(fsmtl.data.Split([x] * 3, ys), epochs=1, batch_size=32)
    for t, task in enumerate(bench.tasks):
        reference.zero_grad()
        task_loss(task, reference(x, t), ys[t]).backward()
        with torch.no_grad():
            for p in reference.parameters():
                if p.grad is not None:
                    p -= lr * p.grad
    for a, b in zip(trainer.model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b)
    averaged = _trainer(bench, METHODS["mtl"].build(), optimizer=sgd)
    averaged.fit(fsmtl.data.Split([x] * 3, ys), epochs=1, batch_size=32)
    assert not torch.allclose(averaged.model.trunk[0].weight, trainer.model.trunk[0].weight)


def test_masked_network_fisher_differs_from_dense_trunk_fisher(bench):
    torch.manual_seed(0)
    model = build_model(bench, hidden=16)
    x, y = bench.train.inputs[0][:64], bench.train.targets[0][:64]
    task = bench.tasks[0]
    dense = task_scores(model, 0, task, x, y, "fs")
    scores = [torch.rand(len(bench.tasks), *p.shape) for p in model.masked_parameters()]
    sparse_mask = task_masks(fsmtl_kernels_topk(scores, 0.2))[0]
    full_mask = [torch.ones_like(m) for m in sparse_mask]
    on_sparse = masked_network_scores(model, 0, task, x, y, sparse_mask, "fs", 32)
    on_full = masked_network_scores(model, 0, task, x, y, full_mask, "fs", 32)
    for a, b in zip(on_full, dense):
        torch.testing.assert_close(a, b)  # a full mask is the dense trunk
    assert any(not torch.allclose(a, b) for a, b in zip(on_sparse, dense))
    before = [p.detach().clone() for p in model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # scored on a copy


def fsmtl_kernels_topk(scores, k):
    import fsmtl_kernels as fk

    return fk.topk_mask_batched(scores, k)


def test_masked_fisher_strategy_scores_the_masked_network(bench):
    options = MethodOptions(keep_ratio=0.2, schedule=MaskSchedule(warmup=0, every=1), samples=32, mask_forward=True)
    masks = {}
    for name in ("fs", "fs-masked"):
        strategy = METHODS[name].build(options)
        trainer = _trainer(bench, strategy)
        trainer.fit(bench.train, epochs=1, batch_size=40)
        first = _masks(strategy)
        trainer.fit(bench.train, epochs=1, batch_size=40)
        masks[name] = (first, _masks(strategy))
    # The first mask has no mask to score under: both score the dense trunk, so they agree.
    assert all(torch.equal(a, b) for a, b in zip(masks["fs"][0], masks["fs-masked"][0]))
    assert any(not torch.equal(a, b) for a, b in zip(masks["fs"][1], masks["fs-masked"][1]))


def test_per_layer_keep_ratio_keeps_the_share_in_every_layer():
    torch.manual_seed(0)
    shapes = [(7, 5), (7,), (3, 7), (3,)]
    scores = [torch.rand(2, *s) for s in shapes]
    scores[0] = scores[0] * 100  # the global top-K would take everything from the first layer
    p = 0.3
    mask = per_layer_topk(scores, p)
    for s, m in zip(shapes, mask.to_bool_stacked()):
        n = torch.Size(s).numel()
        k = max(1, int(p * n + 0.5))
        assert m.reshape(2, -1).sum(1).tolist() == [k, k]
    for s, m in zip(scores, mask.to_bool_stacked()):  # and they are the layer's top-k
        flat, kept = s.reshape(2, -1), m.reshape(2, -1)
        for t in range(2):
            assert flat[t][kept[t]].min() >= flat[t][~kept[t]].max()
    global_mask = fsmtl_kernels_topk(scores, p)
    assert global_mask.to_bool_stacked()[2].sum() == 0  # the global top-K leaves a layer empty here
    with pytest.raises(ValueError, match="float"):
        per_layer_topk(scores, 3)


def test_fs_layer_method_masks_every_layer(bench):
    strategy = METHODS["fs-layer"].build(MethodOptions(keep_ratio=0.25, schedule=MaskSchedule(0, 1), samples=16))
    trainer = _trainer(bench, strategy)
    trainer.fit(bench.train, epochs=1, batch_size=40)
    for p, m in zip(trainer.model.masked_parameters(), strategy.mask.to_bool_stacked()):
        k = max(1, int(0.25 * p.numel() + 0.5))
        assert m.reshape(len(bench.tasks), -1).sum(1).tolist() == [k] * len(bench.tasks)


def test_stl_with_fisher_sparse_updates_is_a_single_task_sparse_method(bench):
    spec = METHODS["stl-fs"]
    assert spec.single_task and spec.sparse
    cfg = ExperimentConfig(
        benchmark="synthetic",
        methods=("stl-fs", "stl"),
        keep_ratios=(0.5,),
        seeds=(0,),
        epochs=2,
        warmup=1,
        update_every=1,
        samples=16,
        hidden=16,
    )
    with pytest.warns(UserWarning):
        results = run_experiment(cfg, benchmark=bench)
    r = results["methods"]["stl-fs"]
    assert r["keep_ratio"] == 0.5 and r["mask_used"] is True and r["avg_rank"] is None
    assert len(r["mask_updates"][0]) == len(bench.tasks)  # one model, one mask history per task
    assert r["test_mean"] != results["methods"]["stl"]["test_mean"]
