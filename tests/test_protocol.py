"""The evaluation protocol: keep ratios chosen on validation with selection
seeds, test scores reported on other seeds, sample std, paired tests against MTL and FS."""

import itertools
import math
import statistics

import pytest
import torch

from fsmtl.data import load_benchmark
from fsmtl.run import experiment
from fsmtl.run.experiment import ExperimentConfig, run_experiment
from fsmtl.run.report import format_table, plot_keep_ratio_curves
from fsmtl.run.stats import format_p, paired_tests, sample_std


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("synthetic", n_samples=200)


def _metrics(bench, mse: float) -> list[dict]:
    return [{"mse": mse, "mae": mse} for _ in bench.tasks]


def _fake_train(calls, val_mse, test_mse):
    """A stand-in for train_once: validation and test MSE from the given functions of (p, seed)."""

    def train_once(benchmark, method, seed, keep_ratio, cfg, progress=None, store=None, parallel=None):
        calls.append((method, seed, keep_ratio))
        return {
            "val": _metrics(benchmark, val_mse(keep_ratio, seed)),
            "test": _metrics(benchmark, test_mse(keep_ratio, seed)),
            "history": {"mask_updates": [{"epoch": 2}]},
        }

    return train_once


CFG = dict(methods=("mtl", "fs"), keep_ratios=(0.1, 0.3, 0.7), select_seeds=(100, 101), seeds=(0, 1, 2))


def _run(monkeypatch, bench, val_mse, test_mse):
    calls = []
    monkeypatch.setattr(experiment, "train_once", _fake_train(calls, val_mse, test_mse))
    return run_experiment(ExperimentConfig(**CFG), benchmark=bench), calls


def _val(p, seed):
    # Selection seeds favour p = 0.3; the reported seeds would favour p = 0.7 if they were used.
    best = 0.3 if seed >= 100 else 0.7
    return 0.5 + abs(p - best) + 0.001 * seed


def test_selection_reads_validation_of_selection_seeds_only(monkeypatch, bench):
    def test(p, s):
        return 0.4 + 0.01 * s + p

    def poisoned_test(p, s):  # the selection runs' test scores favour another ratio, NaN for the chosen one
        return (math.nan if p == 0.3 else -10.0 if p == 0.7 else 5.0) if s >= 100 else test(p, s)

    honest, calls = _run(monkeypatch, bench, _val, test)
    poisoned, poisoned_calls = _run(monkeypatch, bench, _val, poisoned_test)
    assert honest["methods"]["fs"]["keep_ratio"] == poisoned["methods"]["fs"]["keep_ratio"] == 0.3
    assert calls == poisoned_calls
    assert honest["methods"]["fs"]["test_mean"] == poisoned["methods"]["fs"]["test_mean"]
    assert honest["methods"]["fs"]["val_scores"] == poisoned["methods"]["fs"]["val_scores"]
    fs_calls = [c for c in calls if c[0] == "fs"]
    selection = [(s, p) for _, s, p in fs_calls if s in CFG["select_seeds"]]
    report = [(s, p) for _, s, p in fs_calls if s in CFG["seeds"]]
    assert selection == [(s, p) for p in CFG["keep_ratios"] for s in CFG["select_seeds"]]
    assert report == [(s, 0.3) for s in CFG["seeds"]]  # reported seeds: only the chosen ratio, after selection
    assert fs_calls.index(("fs", 0, 0.3)) == len(selection)
    # A dense method has nothing to choose: no selection run.
    assert [c for c in calls if c[0] == "mtl"] == [("mtl", s, 1.0) for s in CFG["seeds"]]
    runs = honest["methods"]["fs"]["runs"]
    assert [(r["seed"], r["keep_ratio"], r["role"]) for r in runs] == [
        *((s, p, "selection") for p in CFG["keep_ratios"] for s in CFG["select_seeds"]),
        *((s, 0.3, "report") for s in CFG["seeds"]),
    ]
    assert all(r["test_score"] == -(0.4 + 0.01 * r["seed"] + r["keep_ratio"]) for r in runs)
    assert honest["protocol"]["select_seeds"] == [100, 101] and honest["protocol"]["seeds"] == [0, 1, 2]


def test_reported_numbers_sample_std_and_paired_tests(monkeypatch, bench):
    results, _ = _run(monkeypatch, bench, _val, lambda p, s: 0.4 + (0.1 if p == 1.0 else 0.0) + 0.01 * s * s)
    fs, mtl = results["methods"]["fs"], results["methods"]["mtl"]
    per_seed = [0.4 + 0.01 * s * s for s in CFG["seeds"]]
    assert fs["test_mean"]["mse"] == pytest.approx(statistics.mean(per_seed))
    assert fs["test_std"]["mse"] == pytest.approx(statistics.stdev(per_seed))  # ddof = 1
    assert fs["test_score_per_seed"] == pytest.approx([-v for v in per_seed])
    # FS better than MTL by exactly 0.1 on every seed: zero variance, the t-test is undefined.
    vs_mtl = fs["paired"]["vs_mtl"]
    assert vs_mtl["wins"] == 3 and vs_mtl["mean_diff"] == pytest.approx(0.1)
    assert vs_mtl["ttest"]["p"] is None and "zero variance" in vs_mtl["ttest"]["reason"]
    assert vs_mtl["wilcoxon"]["p"] == pytest.approx(0.25)  # all 3 positive: 2 * 1/8
    assert set(fs["paired"]) == {"vs_mtl"} and set(mtl["paired"]) == {"vs_fs"}
    table = format_table(results)
    assert "FS: vs mtl: n/a / 0.250 [n/a / 0.250] (3/3 seeds better)" in table  # [Holm-corrected]
    assert "sample std (ddof=1) over the reported seeds 0,1,2" in table


def test_keep_ratio_curve_figure(monkeypatch, bench, tmp_path):
    results, _ = _run(monkeypatch, bench, _val, lambda p, s: 0.4 + p)
    assert [p.name for p in plot_keep_ratio_curves(results, tmp_path)] == ["keep_ratio_curve.png"]
    assert (tmp_path / "keep_ratio_curve.png").stat().st_size > 0
    results["methods"]["fs"]["runs"] = [r for r in results["methods"]["fs"]["runs"] if r["role"] == "report"]
    assert plot_keep_ratio_curves(results, tmp_path) == []  # no choice, no curve


def test_seed_split_is_checked():
    with pytest.raises(ValueError, match="both reported and used for selection"):
        ExperimentConfig(seeds=(0, 1), select_seeds=(1, 2))
    with pytest.raises(ValueError, match="select_seeds must not be empty"):
        ExperimentConfig(select_seeds=())
    with pytest.raises(ValueError, match="repeated"):
        ExperimentConfig(seeds=(0, 0))


def _t_cdf_df4(t: float) -> float:
    """Student's t CDF with 4 degrees of freedom in closed form."""
    u = t / math.sqrt(4 + t * t)
    return 0.5 + 0.75 * u - 0.25 * u**3


def test_paired_tests_against_hand_computed_values():
    a = [3.0, 5.0, 1.0, 9.0, 10.0]
    b = [2.0, 3.0, 4.0, 5.0, 5.0]  # differences 1, 2, -3, 4, 5: no ties, no zeros
    d = [x - y for x, y in zip(a, b)]
    mean = sum(d) / 5
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 4)
    t = mean / (sd / math.sqrt(5))
    out = paired_tests(a, b)
    assert out["n"] == 5 and out["wins"] == 4 and out["losses"] == 1 and out["mean_diff"] == pytest.approx(1.8)
    assert out["ttest"]["statistic"] == pytest.approx(t)
    assert out["ttest"]["p"] == pytest.approx(2 * (1 - _t_cdf_df4(t)))
    # Wilcoxon: ranks of |d| are 1..5, the negative one has rank 3, so W = min(W+, W-) = 3; the exact
    # two-sided p is 2 P(W <= 3) over the 2^5 equally likely sign patterns.
    below = sum(1 for r in range(6) for c in itertools.combinations(range(1, 6), r) if sum(c) <= 3)
    assert out["wilcoxon"]["statistic"] == 3.0
    assert out["wilcoxon"]["p"] == pytest.approx(2 * below / 32)
    assert format_p(out["wilcoxon"]) == "0.312"


def test_paired_tests_undefined_cases():
    one = paired_tests([1.0], [0.0])
    assert one["ttest"]["p"] is None and one["wilcoxon"]["p"] is None and "at least 2" in one["ttest"]["reason"]
    same = paired_tests([1.0, 2.0], [1.0, 2.0])
    assert same["ttest"]["p"] is None and "zero" in same["wilcoxon"]["reason"]
    with pytest.raises(ValueError, match="one value per seed"):
        paired_tests([1.0, 2.0], [1.0])
    assert sample_std([1.0]) is None and sample_std([1.0, 3.0]) == pytest.approx(math.sqrt(2))
    assert format_p(None) == "n/a" and format_p({"p": 1e-5}) == "<0.001"


@pytest.mark.slow
def test_protocol_end_to_end_tiny(bench):
    cfg = ExperimentConfig(
        benchmark="synthetic",
        methods=("mtl", "fs"),
        keep_ratios=(0.3, 0.7),
        select_seeds=(100,),
        seeds=(0, 1),
        epochs=2,
        warmup=1,
        update_every=1,
        samples=16,
        hidden=16,
    )
    results = run_experiment(cfg, benchmark=bench)
    fs = results["methods"]["fs"]
    roles = [(r["seed"], r["role"]) for r in fs["runs"]]
    assert roles == [(100, "selection"), (100, "selection"), (0, "report"), (1, "report")]
    assert {r["keep_ratio"] for r in fs["runs"] if r["role"] == "report"} == {fs["keep_ratio"]}
    assert fs["keep_ratio"] == max((0.3, 0.7), key=lambda p: fs["val_scores"][str(p)])
    assert fs["test_score_std"] == pytest.approx(statistics.stdev(fs["test_score_per_seed"]))
    assert fs["paired"]["vs_mtl"]["n"] == 2


def test_mask_overlap_spread_is_the_sample_std_over_seeds():
    a = {"overlap": [[1.0, 0.2], [0.2, 1.0]], "sizes": [3, 3]}
    b = {"overlap": [[1.0, 0.4], [0.4, 1.0]], "sizes": [3, 3]}
    out = experiment._mask_summary([a, None, b], 0.5)
    assert out["overlap"][0][1] == pytest.approx(0.3)
    assert out["overlap_std"][0][1] == pytest.approx(0.1414213562)  # ddof=1: sqrt(0.02), not 0.1
    assert out["overlap_seeds"] == 2 and out["random_overlap"] == pytest.approx(1 / 3)
    assert experiment._mask_summary([a], 0.5)["overlap_std"] is None  # one seed: no spread


def test_run_protocol_chooses_on_validation_and_reports_on_fresh_seeds():
    """The one protocol, with a fake training run: every candidate on every selection seed, the
    best mean validation score chosen (the earlier ratio on a tie), then the reported seeds; with a
    curve every candidate is reported. A dense method has no candidates to choose from."""
    from fsmtl.run.protocol import planned_runs, run_protocol

    calls = []
    val = {(100, 0.1): 0.2, (101, 0.1): 0.4, (100, 0.5): 0.5, (101, 0.5): 0.1, (100, 0.9): 0.3, (101, 0.9): 0.3}

    def train(seed, p, role):
        calls.append((seed, p, role))
        return {"val": val.get((seed, p), -1.0), "test": seed + p}

    outcome = run_protocol("fs", (0.1, 0.5, 0.9), (100, 101), (0, 1), train, lambda r: r["val"])
    assert outcome.val_scores == pytest.approx({0.1: 0.3, 0.5: 0.3, 0.9: 0.3})
    assert outcome.chosen == 0.1  # three equal means: the first
    assert calls[:6] == [(s, p, "selection") for p in (0.1, 0.5, 0.9) for s in (100, 101)]
    assert calls[6:] == [(0, 0.1, "report"), (1, 0.1, "report")]
    assert [r["test"] for r in outcome.reported[0.1]] == [0.1, 1.1]
    assert planned_runs("fs", (0.1, 0.5, 0.9), (100, 101), (0, 1)) == len(calls) == 8
    val[(101, 0.9)] = 0.9
    calls.clear()
    curve = run_protocol("fs", (0.1, 0.5, 0.9), (100, 101), (0, 1), train, lambda r: r["val"], curve=True)
    assert curve.chosen == 0.9 and list(curve.reported) == [0.1, 0.5, 0.9]
    calls.clear()
    dense = run_protocol("mtl", (0.1, 0.5), (100, 101), (0, 1, 2), train, lambda r: r["val"])
    assert (dense.chosen, dense.val_scores, calls) == (1.0, {}, [(s, 1.0, "report") for s in (0, 1, 2)])


def test_fsmtl_run_and_fsmtl_study_choose_and_report_the_same(tmp_path):
    """Both commands go through the one protocol: on the same settings the study's cells hold the
    same validation scores, chosen keep ratio and reported test scores as results.json."""
    from fsmtl.run.study import run_study

    settings = {"epochs": 1, "warmup": 0, "update_every": 1, "samples": 16, "hidden": 16}
    options = {"n_samples": 200, "n_tasks": 2}
    cfg = ExperimentConfig(benchmark="synthetic", methods=("mtl", "fs"), seeds=(0, 1), select_seeds=(100,),
                           keep_ratios=(0.3, 0.7), benchmark_options=options, **settings)  # fmt: skip
    results = run_experiment(cfg)
    spec = {"name": "same", "seeds": [0, 1], "select_seeds": [100], "settings": settings,
            "grid": [{"benchmark": "synthetic", "benchmark_options": {"n_samples": 200, "n_tasks": 2},
                      "methods": ["mtl", "fs"], "keep_ratios": [0.3, 0.7]}]}  # fmt: skip
    study = run_study(spec, tmp_path, log=lambda line: None)
    setting = study["settings"][0]
    fs = results["methods"]["fs"]
    assert setting["methods"]["fs"]["chosen"] == fs["keep_ratio"]
    assert setting["methods"]["fs"]["val_scores"] == fs["val_scores"]
    for method in ("mtl", "fs"):
        row = next(r for r in setting["rows"].values() if r["method"] == method and r["chosen"])
        assert row["scores"] == results["methods"][method]["test_score_per_seed"]


def test_plateau_schedule_validates_every_epoch_and_reports_the_best_epoch(bench):
    """``lr_schedule="plateau"`` (qm9-paper's Nash-MTL schedule): a validation per epoch, the
    learning rate cut after 5 epochs without a lower validation loss, and the best validation
    epoch's model evaluated; with no schedule, no validation runs during training."""
    cfg = ExperimentConfig(benchmark="synthetic", methods=("mtl",), epochs=10, hidden=16, lr=0.1, lr_schedule="plateau")
    run = experiment.train_once(bench, "mtl", 0, 1.0, cfg)
    history = run["history"]
    assert [e["epoch"] for e in history["val"]] == list(range(10))
    best = max(history["val"], key=lambda e: e["score"])
    assert history["best_epoch"] == best["epoch"] < 9  # so the evaluated model is not the last one
    for got, want in zip(run["val"], best["metrics"], strict=True):  # the best epoch's model was evaluated
        assert got == pytest.approx(want)
    scheduler = experiment.build_lr_scheduler("plateau", torch.optim.Adam([torch.zeros(1, requires_grad=True)], 1e-3))
    assert (scheduler.mode, scheduler.factor, scheduler.patience, scheduler.min_lrs) == ("min", 0.7, 5, [1e-5])
    plain = experiment.train_once(bench, "mtl", 0, 1.0, ExperimentConfig(benchmark="synthetic", epochs=2, hidden=16))
    assert plain["history"]["val"] == []
    with pytest.raises(ValueError, match="lr_schedule must be one of"):
        ExperimentConfig(lr_schedule="cosine")
