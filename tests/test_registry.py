"""The method and task-kind registries: every entry builds what it says, and a new entry needs
nothing but its record."""

import pytest
import torch

from fsmtl.estimators import ESTIMATORS
from fsmtl.run.experiment import ExperimentConfig, run_experiment
from fsmtl.run.report import format_table
from fsmtl.strategies import (
    AGGREGATORS,
    METHODS,
    Composed,
    EqualWeighting,
    FisherSparse,
    JacobianAggregation,
    Method,
    MethodOptions,
    get_method,
)
from fsmtl.strategies.sparse.base import SparseStrategy
from fsmtl.tasks import TASK_KINDS, Task, TaskKind, register_task_kind, task_kind
from fsmtl.tasks.losses import class_log_probs, task_loss
from fsmtl.tasks.metrics import METRIC_DIRECTION, task_metrics
from fsmtl.tasks.regression import Regression


def test_method_names_labels_and_flags():
    assert list(METHODS)[:7] == ["stl", "mtl", "rs", "fs", "efs", "grad2", "absgrad"]
    assert len({m.label for m in METHODS.values()}) == len(METHODS)
    assert [n for n, m in METHODS.items() if m.single_task] == ["stl", "stl-fs"]
    # fsmtl.strategies.sparse.variants
    variants = ["rs-redraw", "fs-layer", "fs-masked", "fs-avg", "fs-turns", "stl-fs"]
    assert [n for n, m in METHODS.items() if m.sparse] == ["rs", *ESTIMATORS, *variants, "tr", "mr"]
    assert {m.variant: n for n, m in METHODS.items() if m.strategy is FisherSparse} == {e: e for e in ESTIMATORS}
    assert {m.variant for m in METHODS.values() if m.strategy is JacobianAggregation} == set(AGGREGATORS)
    assert all("torchjd" in m.requires for m in METHODS.values() if m.strategy is JacobianAggregation)
    with pytest.raises(ValueError, match="'nope' is not one of"):
        get_method("nope")


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_builds_its_strategy(name):
    method = METHODS[name]
    options = MethodOptions(keep_ratio=0.3, samples=7, mask_forward=True, normalize="selected")
    strategy = method.build(options)
    assert type(strategy) is method.strategy
    if method.sparse:
        assert (strategy.architecture if isinstance(strategy, Composed) else strategy).keep_ratio == 0.3
    if method.sparse and method.name not in ("tr", "mr"):  # TR/MR: p is each layer's share of units
        assert isinstance(strategy, SparseStrategy)
        assert (strategy.mask_forward, strategy.normalize) == (True, "selected")
    if method.strategy is FisherSparse:
        assert (strategy.estimator, strategy.samples) == (method.variant, 7)
    if method.strategy is JacobianAggregation:
        assert strategy.aggregator == method.variant


def test_missing_packages_are_a_config_error(monkeypatch):
    fake = Method("fake", "FAKE", lambda o: EqualWeighting(), EqualWeighting, requires=("torch", "fsmtl_no_such_pkg"))
    monkeypatch.setitem(METHODS, "fake", fake)
    assert fake.missing_packages() == ["fsmtl_no_such_pkg"]
    with pytest.raises(ValueError, match="method 'fake' needs fsmtl_no_such_pkg"):
        ExperimentConfig(methods=["mtl", "fake"])


def test_a_new_method_is_one_record(monkeypatch):
    monkeypatch.setitem(METHODS, "mean2", Method("mean2", "Mean-2", lambda o: EqualWeighting(), EqualWeighting))
    cfg = ExperimentConfig(
        benchmark="synthetic",
        benchmark_options={"n_tasks": 2, "n_samples": 60},
        methods=["mtl", "mean2"],
        seeds=[0],
        epochs=1,
        hidden=8,
    )
    results = run_experiment(cfg)
    assert results["methods"]["mean2"]["test_mean"] == results["methods"]["mtl"]["test_mean"]
    rows = format_table(results).splitlines()[3:]
    assert [line.split()[0] for line in rows[: rows.index("")]] == ["MTL", "Mean-2"]  # then notes


def test_task_kinds():
    assert list(TASK_KINDS) == ["binary", "multiclass", "regression", "segmentation", "depth", "multilabel"]
    assert {n: k.primary_metric for n, k in TASK_KINDS.items()} == {
        "binary": "f1",
        "multiclass": "f1",
        "regression": "mse",
        "segmentation": "miou",
        "depth": "abs_err",
        "multilabel": "f1",
    }
    assert [n for n, k in TASK_KINDS.items() if k.dense] == ["segmentation", "depth"]
    assert [n for n, k in TASK_KINDS.items() if k.classification] == ["binary", "multiclass"]
    with pytest.raises(ValueError, match="'ranking' is not one of"):
        task_kind("ranking")


@pytest.mark.parametrize(
    ("task", "outputs", "targets"),
    [
        (Task("b", "binary", 1), torch.randn(5, 1), torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0])),
        (Task("m", "multiclass", 3), torch.randn(5, 3), torch.tensor([0, 2, 1, 1, 0])),
        (Task("r", "regression", 1), torch.randn(5, 1), torch.randn(5)),
    ],
)
def test_sample_kinds_mean_loss_is_the_mean_of_per_sample_losses(task, outputs, targets):
    kind = task_kind(task.kind)
    kind.check_target(task, targets, 5, "here")
    per = task_loss(task, outputs, targets, reduction="none")
    assert per.shape == (5,)
    assert torch.equal(task_loss(task, outputs, targets), per.mean())
    if kind.classification:
        torch.testing.assert_close(class_log_probs(task, outputs).exp().sum(1), torch.ones(5))
    else:
        with pytest.raises(ValueError, match="no class distribution"):
            class_log_probs(task, outputs)
    with pytest.raises(ValueError, match="needs targets of dtype"):
        kind.check_target(task, targets.double(), 5, "here")


@pytest.fixture
def restore_kinds():
    kinds, directions = dict(TASK_KINDS), dict(METRIC_DIRECTION)
    yield
    TASK_KINDS.clear(), TASK_KINDS.update(kinds)
    METRIC_DIRECTION.clear(), METRIC_DIRECTION.update(directions)


def test_a_new_task_kind_is_one_record(restore_kinds):
    class Huber(Regression):
        name = "huber"
        metrics = {"mae": False}
        primary_metric = "mae"

        def per_sample_loss(self, outputs, targets):
            return torch.nn.functional.huber_loss(outputs.reshape(-1), targets, reduction="none")

        def compute_metrics(self, task, outputs, targets):
            return {"mae": float((outputs - targets).abs().mean())}

    register_task_kind(Huber())
    task = Task("h", "huber", 1)
    out, y = torch.tensor([[0.0], [3.0]]), torch.tensor([0.5, 0.0])
    assert task_loss(task, out, y).item() == pytest.approx((0.125 + 2.5) / 2)
    assert task_metrics(task, out, y) == {"mae": 1.75}
    with pytest.raises(ValueError, match="already registered"):
        register_task_kind(Huber())

    class Flipped(Huber):
        name = "flipped"
        metrics = {"mae": True}

    with pytest.raises(ValueError, match="opposite direction"):
        register_task_kind(Flipped())
    assert isinstance(TASK_KINDS["huber"], TaskKind)
