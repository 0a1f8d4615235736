"""What ``fsmtl run`` writes: results.json's metadata, the CSV's mean/std/per-seed rows,
figures with error bars, axes from 0 and titles saying what is averaged, the overlap averaged over
seeds with the random-mask reference, the small-test-split warning, and the per-run progress."""

from __future__ import annotations

import csv
import datetime
import io
import json
import os
import subprocess
import sys

import matplotlib.figure
import pytest

from fsmtl.run import report
from fsmtl.run.progress import Progress

ARGS = ["run", "--benchmark", "synthetic", "-o", "n_samples=200", "-o", "task_kind=binary", "--methods", "mtl,fs",
        "--seeds", "0,1", "--keep-ratios", "0.5", "--epochs", "3", "--warmup", "1", "--update-every", "1",
        "--samples", "16", "--hidden", "16", "--no-progress"]  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One tiny run in a fresh process (its stderr as a user sees it)."""
    out = tmp_path_factory.mktemp("report")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "fsmtl", *ARGS, "--out", str(out)], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return out, json.loads((out / "results.json").read_text()), done.stderr


def test_results_json_records_versions_command_times_and_machine(run):
    out, results, _ = run
    env = results["environment"]
    assert {"fsmtl-kernels", "torch", "triton", "python", "numpy"} <= set(env["versions"])
    assert env["versions"]["torch"] and env["versions"]["python"].count(".") == 2
    machine = env["machine"]
    assert machine["cpu"] and machine["logical_cpus"] >= 1 and machine["torch_threads"] >= 1
    assert machine["device"] == "cpu"
    assert results["command"] == "fsmtl " + " ".join([*ARGS, "--out", str(out)])
    started = datetime.datetime.fromisoformat(results["started_at"])
    ended = datetime.datetime.fromisoformat(results["ended_at"])
    assert started.tzinfo is not None and started <= ended
    assert results["config"]["seeds"] == [0, 1]


def test_a_small_test_split_is_warned_about(run):
    out, results, stderr = run
    # 200 samples, 20% test: 40 test examples per task, under the 50 that make metrics meaningful.
    assert len(results["warnings"]) == 4 and "only 40 test example(s) (< 50)" in results["warnings"][0]
    warned = [line for line in stderr.splitlines() if line.startswith("fsmtl: warning: task ")]
    assert len(warned) == 4 and "not meaningful" in warned[0]
    assert (out / "table.txt").read_text().strip().splitlines()[-1].startswith("warning: task 'task3'")


def test_csv_has_mean_std_and_one_row_per_seed(run):
    out, results, _ = run
    with (out / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    tasks = [t["name"] for t in results["benchmark"]["tasks"]]
    assert list(rows[0])[:5] == ["method", "keep_ratio", "statistic", "seed", "task"]
    for method, r in results["methods"].items():
        mine = [row for row in rows if row["method"] == method]
        assert len(mine) == (len(tasks) + 1) * (2 + 2)  # mean, std, seed 0, seed 1; each task + average
        by = {(row["statistic"], row["seed"], row["task"]): row for row in mine}
        assert float(by["mean", "", "average"]["f1"]) == pytest.approx(r["test_mean"]["f1"])
        assert float(by["std", "", "average"]["f1"]) == pytest.approx(r["test_std"]["f1"])
        assert by["mean", "", "average"]["avg_rank"] == str(r["avg_rank"])
        for i, seed in enumerate((0, 1)):
            assert float(by["seed", str(seed), "average"]["f1"]) == pytest.approx(r["test_per_seed"][i]["f1"])
            assert float(by["seed", str(seed), tasks[2]]["accuracy"]) == pytest.approx(
                r["test_per_seed_per_task"][i][2]["accuracy"]
            )
        assert float(by["std", "", tasks[1]]["f1"]) == pytest.approx(r["test_per_task_std"][1]["f1"])
    assert {row["keep_ratio"] for row in rows if row["method"] == "fs"} == {"0.5"}


def test_overlap_is_the_mean_over_seeds_with_the_random_reference(run):
    _, results, _ = run
    fs = results["methods"]["fs"]
    finals = [updates[-1]["overlap"] for updates in fs["mask_updates"]]  # each seed's last mask
    assert fs["mask"]["overlap_seeds"] == 2
    for i in range(4):
        for j in range(4):
            assert fs["mask"]["overlap"][i][j] == pytest.approx((finals[0][i][j] + finals[1][i][j]) / 2)
    assert fs["mask"]["random_overlap"] == pytest.approx(0.5 / 1.5)


def test_figures_have_error_bars_zero_based_axes_and_say_what_is_averaged(run, tmp_path, monkeypatch):
    _, results, _ = run
    saved = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, path, **kw: saved.append(fig))
    paths = report.plot_figures(results, tmp_path)
    assert [p.name for p in paths] == ["per_task_f1.png", "overlap_fs.png"]
    bars = saved[0].axes[0]
    assert bars.get_ylim() == (0.0, 1.0)
    assert "mean over 2 seed(s)" in bars.get_title() and "std over seeds" in bars.get_title()
    containers = [c for c in bars.containers if hasattr(c, "errorbar")]
    assert len(containers) == 2 and all(c.errorbar is not None for c in containers)
    heat, colorbar = saved[1].axes
    assert "mean over 2 seed(s)" in heat.get_title() and "random masks: 0.33" in heat.get_title()
    marks = [line.get_ydata()[0] for line in colorbar.get_lines()]
    assert any(m == pytest.approx(1 / 3) for m in marks)


def test_progress_in_a_log_is_plain_lines_with_phases():
    stream = io.StringIO()
    progress = Progress(2, stream=stream, tty=False, log_every=0.0)
    bar = progress.run("fs seed 0 p=0.5", 3)
    bar.phase("warm-up")
    bar.update()
    bar.phase("mask update")
    bar.phase("training")
    bar.update(2)
    bar.phase("evaluation")
    bar.close()
    progress.run("mtl seed 1", 1).close()
    text = stream.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert lines[0] == "[1/2] fs seed 0 p=0.5: started, 3 steps"
    assert lines[1].startswith("[1/2] fs seed 0 p=0.5: 1/3 steps, warm-up, ")  # log_every=0: a line per step
    done = next(line for line in lines if line.startswith("[1/2] fs seed 0 p=0.5: done, 3/3 steps in "))
    for phase in ("setup", "warm-up", "mask update", "training", "evaluation"):
        assert f"{phase} " in done
    assert lines[-2:][0] == "[2/2] mtl seed 1: started, 1 steps"


def test_progress_on_a_terminal_is_one_bar_per_run_showing_the_phase():
    stream = io.StringIO()
    progress = Progress(1, stream=stream, tty=True)
    bar = progress.run("mtl seed 0", 4)
    bar.phase("training")
    bar.update(4)
    bar.close()
    text = stream.getvalue()
    assert "[1/1] mtl seed 0" in text and "4/4" in text and "training" in text
