"""``fsmtl study``: a declared grid, resumable cell by cell, and its Markdown report."""

import json

import pytest
import torch

from fsmtl.run import study as study_module
from fsmtl.run.cli import main
from fsmtl.run.info import machine
from fsmtl.run.study import expand, load_spec, run_study

SPEC = {
    "name": "tiny",
    "description": "A tiny grid for the tests.",
    "seeds": [0, 1],
    "select_seeds": [100],
    "settings": {"epochs": 1, "warmup": 0, "update_every": 1, "samples": 16, "hidden": 16},
    "grid": [
        {
            "benchmark": "synthetic",
            "benchmark_options": {"n_samples": 200, "n_tasks": 2, "relatedness": [0.0, 0.6]},
            "methods": ["mtl", "fs"],
            "keep_ratios": [0.3, 0.7],
            "curve": True,
        }
    ],
}


def _write(tmp_path, spec):
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    return path


def test_spec_expands_to_settings_and_is_checked(tmp_path):
    spec = load_spec(_write(tmp_path, SPEC))
    settings = expand(spec)
    assert [s["config"]["benchmark_options"]["relatedness"] for s in settings] == [0.0, 0.6]
    assert all(s["config"]["seeds"] == (0, 1) and s["config"]["select_seeds"] == (100,) for s in settings)
    assert settings[0]["label"] == "synthetic, n_samples=200, n_tasks=2, relatedness=0.0, epochs=1, hidden=16, " \
        "samples=16, update_every=1, warmup=0"  # fmt: skip
    with pytest.raises(ValueError, match="both reported and used for selection"):
        load_spec(_write(tmp_path, {**SPEC, "select_seeds": [1]}))
    with pytest.raises(ValueError, match="unknown keys"):
        load_spec(_write(tmp_path, {**SPEC, "grid": [{"benchmark": "synthetic", "widht": 3}]}))
    with pytest.raises(ValueError, match="not one of"):
        load_spec(_write(tmp_path, {**SPEC, "grid": [{"methods": ["nope"]}]}))


def test_study_runs_resumes_and_reports(tmp_path, monkeypatch):
    out = tmp_path / "out"
    calls = []
    real = study_module.train_once

    def counted(bench, method, seed, p, cfg, *args, **kwargs):
        calls.append((cfg.benchmark_options["relatedness"], method, seed, p))
        return real(bench, method, seed, p, cfg, *args, **kwargs)

    monkeypatch.setattr(study_module, "train_once", counted)
    spec = load_spec(_write(tmp_path, SPEC))
    first = run_study(spec, out, log=lambda line: None)
    # Per setting: FS selection (2 ratios x 1 seed), FS curve (2 ratios x 2 seeds), MTL (2 seeds).
    assert len(calls) == 2 * (2 + 4 + 2) == len(list((out / "cells").glob("*.json")))
    setting = first["settings"][0]
    assert set(setting["rows"]) == {"mtl@1", "fs@0.3", "fs@0.7"}
    chosen = setting["methods"]["fs"]["chosen"]
    assert setting["rows"][f"fs@{chosen:g}"]["chosen"] and setting["rows"][f"fs@{chosen:g}"]["paired"]["vs_mtl"]
    assert setting["rows"]["mtl@1"]["std"] is not None and len(setting["rows"]["mtl@1"]["scores"]) == 2
    report = (out / "report.md").read_text()
    assert "selection seeds 100" in report and "reported on seeds 0, 1" in report
    assert report.count("| FS | ") == 4 and "![curve_1.png](curve_1.png)" in report
    where = f"{machine()['cpu']}, cpu, {torch.get_num_threads()} torch thread(s): 16 cell(s)"
    assert first["computed_on"] == [where] and f"Cells computed on: {where}." in report
    for name in ("curve_1.png", "curve_2.png", "per_task_1.png", "study.json"):
        assert (out / name).stat().st_size > 0
    # Finished cells are skipped; a lost cell is the only one trained again.
    calls.clear()
    again = run_study(spec, out, log=lambda line: None)
    assert calls == [] and again["settings"] == first["settings"]
    victim = sorted((out / "cells").glob("*.json"))[0]
    record = json.loads(victim.read_text())
    victim.unlink()
    run_study(spec, out, log=lambda line: None)
    assert [(c[1], c[2], c[3]) for c in calls] == [(record["method"], record["seed"], record["keep_ratio"])]


def test_study_command(tmp_path, capsys):
    spec = {**SPEC, "grid": [{**SPEC["grid"][0], "methods": ["mtl"], "benchmark_options": {"n_samples": 200}}]}
    assert main(["study", str(_write(tmp_path, spec)), "--out", str(tmp_path / "o")]) == 0
    assert "wrote" in capsys.readouterr().out and (tmp_path / "o" / "report.md").is_file()
