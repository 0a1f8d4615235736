"""What a QM9 report shows: MAE per target in published units, Delta M% against STL and the mean
rank (checked by hand), Holm-corrected p-values, and the table and figures of ``fsmtl run`` and
``fsmtl study`` on the molecule fixture."""

import json
from pathlib import Path

import pytest

from fsmtl.run.experiment import ExperimentConfig, run_experiment
from fsmtl.run.report import format_table, plot_figures
from fsmtl.run.stats import holm, holm_family
from fsmtl.run.study import format_report, run_study
from fsmtl.run.units import delta_m, mean_ranks, published_reference, unit_summary

FIXTURE = str(Path(__file__).parent / "fixtures" / "qm9")


def test_delta_m_and_mean_rank_by_hand():
    # +10% and -20% against the reference: mean -5%.
    assert delta_m([1.1, 40.0], [1.0, 50.0]) == pytest.approx(-5.0)
    # A higher-is-better metric counts its decrease as a loss: +10% (lower) and +20%.
    assert delta_m([1.1, 40.0], [1.0, 50.0], higher=[False, True]) == pytest.approx(15.0)
    with pytest.raises(ValueError, match="one value per target"):
        delta_m([1.0], [1.0, 2.0])
    ranks = mean_ranks({"a": [1.0, 5.0, 2.0], "b": [2.0, 5.0, 1.0], "c": [3.0, 1.0, 3.0]})
    assert ranks == pytest.approx({"a": (1 + 2.5 + 2) / 3, "b": (2 + 2.5 + 1) / 3, "c": 7 / 3})


def test_unit_summary_scales_standardised_maes_and_compares_with_stl():
    scales = [2.0, 1000.0]
    runs = {
        "stl": [[{"mae": 0.5}, {"mae": 0.01}], [{"mae": 0.5}, {"mae": 0.03}]],  # MAE 1.0 and 20 (mean)
        "mtl": [[{"mae": 0.55}, {"mae": 0.02}], [{"mae": 0.65}, {"mae": 0.02}]],  # 1.1 / 1.3 and 20
    }
    summary = unit_summary(runs, scales, published=[1.0, 10.0])
    assert summary["stl"]["mae"] == pytest.approx([1.0, 20.0]) and summary["stl"]["delta_m"] == pytest.approx(0.0)
    assert summary["stl"]["mean_rank"] is None and summary["mtl"]["mean_rank"] == 1.0
    assert summary["mtl"]["mae"] == pytest.approx([1.2, 20.0])
    assert summary["mtl"]["delta_m_per_seed"] == pytest.approx([5.0, 15.0])  # (10% + 0) / 2, (30% + 0) / 2
    assert summary["mtl"]["delta_m"] == pytest.approx(10.0) and summary["mtl"]["delta_m_std"] == pytest.approx(50**0.5)
    assert summary["mtl"]["delta_m_published"] == pytest.approx(((10 + 100) / 2 + (30 + 100) / 2) / 2)


def test_published_reference_only_for_the_published_split():
    tasks = [{"name": n} for n in ("mu", "alpha", "homo", "lumo", "r2", "zpve", "U0", "U", "H", "G", "cv")]
    paper = {"benchmark": {"name": "qm9", "tasks": tasks}, "config": {"benchmark_options": {"n_train": 110000}}}
    assert published_reference(paper)[:3] == [0.0671, 0.1814, 60.576]
    small = {"benchmark": {"name": "qm9", "tasks": tasks}, "config": {"benchmark_options": {"n_train": 500}}}
    assert published_reference(small) is None


def test_holm_by_hand():
    # sorted 0.01, 0.03, 0.04 of m = 3: 3 * 0.01, max(0.03, 2 * 0.03), max(0.06, 1 * 0.04)
    adjusted = holm([0.01, 0.04, 0.03, None])
    assert adjusted[:3] == pytest.approx([0.03, 0.06, 0.06]) and adjusted[3] is None
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert holm([]) == []
    tests = [{"ttest": {"p": 0.02}, "wilcoxon": {"p": 0.25}}, {"ttest": {"p": 0.01}, "wilcoxon": {"p": None}}]
    holm_family(tests)
    assert [t["ttest"]["p_holm"] for t in tests] == pytest.approx([0.02, 0.02])
    assert tests[0]["wilcoxon"]["p_holm"] == 0.25 and tests[1]["wilcoxon"]["p_holm"] is None


@pytest.fixture(scope="module")
def qm9_run(tmp_path_factory):
    pytest.importorskip("rdkit")
    cache = str(tmp_path_factory.mktemp("qm9-cache"))
    cfg = ExperimentConfig(
        benchmark="qm9",
        benchmark_options={
            "n_train": 16,
            "n_val": 8,
            "n_test": 8,
            "source": FIXTURE,
            "cache_dir": cache,
            "targets": "mu,U0",
        },
        methods=("stl", "mtl"),
        seeds=(0, 1),
        select_seeds=(100,),
        keep_ratios=(0.5,),
        epochs=1,
        batch_size=16,
        warmup=0,
        update_every=1,
        samples=4,
    )
    return run_experiment(cfg), cache


def test_run_table_and_figures_show_units_delta_m_and_holm(qm9_run, tmp_path):
    results, _ = qm9_run
    assert [t["unit"] for t in results["benchmark"]["tasks"]] == ["D", "meV"]
    table = format_table(results)
    assert "| method | mu (D) | U0 (meV) | ΔM% vs STL | mean rank |" in table
    stl_row = next(line for line in table.splitlines() if line.startswith("| STL |"))
    assert stl_row.endswith("| - |")  # STL is not ranked
    mtl, mu = results["methods"]["mtl"], results["benchmark"]["tasks"][0]
    expected = sum(run[0]["mae"] for run in mtl["test_per_seed_per_task"]) / 2 * mu["scale"]
    assert f"| MTL | {expected:.4g} ± " in table  # the standardised MAE times the task's scale
    assert "Holm-corrected over the 1 distinct comparisons" in table  # STL against MTL
    names = [p.name for p in plot_figures(results, tmp_path)]
    assert "relative_mae.png" in names


def test_study_report_shows_units_and_holm(qm9_run, tmp_path):
    _, cache = qm9_run
    spec = {
        "name": "qm9-tiny",
        "description": "tiny",
        "seeds": [0],
        "select_seeds": [100],
        "settings": {"epochs": 1, "batch_size": 16, "warmup": 0, "samples": 4},
        "grid": [
            {
                "benchmark": "qm9",
                "benchmark_options": {
                    "n_train": 16,
                    "n_val": 8,
                    "n_test": 8,
                    "source": FIXTURE,
                    "cache_dir": cache,
                    "targets": "mu,G",
                },
                "methods": ["stl", "mtl", "rlw"],
            }
        ],
    }
    study = run_study(spec, tmp_path, log=lambda line: None)
    setting = study["settings"][0]
    assert setting["units"]["stl"]["delta_m"] == pytest.approx(0.0) and setting["units"]["stl"]["mean_rank"] is None
    ranks = [setting["units"][m]["mean_rank"] for m in ("mtl", "rlw")]
    assert sum(ranks) == pytest.approx(3.0) and all(1.0 <= r <= 2.0 for r in ranks)
    report = (tmp_path / "report.md").read_text()
    assert "| method | mu (D) | G (meV) | ΔM% vs STL | mean rank |" in report
    assert "In brackets: the same p-values with Holm's correction" in report
    assert "![relative_mae_1.png](relative_mae_1.png)" in report and (tmp_path / "relative_mae_1.png").is_file()
    tests = [t for row in setting["rows"].values() for t in row["paired"].values()]
    assert all("p_holm" in t["ttest"] for t in tests)
    assert format_report(json.loads(json.dumps(study, default=str)), {}).startswith("# Study `qm9-tiny`")


def test_presets_the_published_protocol_and_the_cpu_setting():
    from fsmtl.run.presets import PRESETS, resolve_settings

    paper = resolve_settings({"benchmark": "qm9"}, set(), "qm9-paper")
    assert (paper["model"], paper["batch_size"], paper["lr"], paper["epochs"]) == ("mpnn-complete", 120, 1e-3, 300)
    assert paper["lr_schedule"] == "plateau"  # Nash-MTL's ReduceLROnPlateau and best-validation test
    assert paper["benchmark_options"] == {"n_train": 110000, "n_val": 10000, "n_test": 10000}
    cpu = resolve_settings({"benchmark": "qm9"}, set(), "qm9")
    plain = resolve_settings({"benchmark": "qm9"}, set(), None)  # `fsmtl run --benchmark qm9`
    assert cpu == plain and cpu["model"] == "mpnn" and cpu["benchmark_options"]["n_train"] == 500
    assert "lr_schedule" not in cpu  # a constant rate on the CPU setting
    assert "factor 0.7, patience 5" in PRESETS["qm9-paper"].sources["lr_schedule"]
