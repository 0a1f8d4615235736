"""The ``fsmtl`` command end to end on a tiny configuration, and its error handling."""

import json
import subprocess
import sys

import pytest

from fsmtl.run.cli import main


@pytest.mark.slow
def test_run_end_to_end(tmp_path, capsys):
    out = tmp_path / "res"
    code = main(
        [
            "run",
            "--benchmark",
            "synthetic",
            "--methods",
            "stl,mtl,rs,fs,efs",
            "--seeds",
            "0,1",
            "--keep-ratios",
            "0.3,0.7",
            "--epochs",
            "3",
            "--warmup",
            "1",
            "--update-every",
            "1",
            "--samples",
            "16",
            "--hidden",
            "16",
            "-o",
            "task_kind=binary",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    lines = printed.splitlines()
    assert lines[0] == "synthetic: 4 tasks, test set, mean +- std over 2 seeds (^ higher is better, v lower)"
    assert lines[1].split() == [
        "Model",
        "p",
        "accuracy",
        "^",
        "precision",
        "^",
        "recall",
        "^",
        "f1",
        "^",
        "Avg",
        "Rank",
    ]
    assert set(lines[2]) == {"-", " "}
    rows = [line.split() for line in lines[3:8]]
    assert [r[0] for r in rows] == ["STL", "MTL", "RS", "FS", "EFS"] and lines[8] == ""
    methods = results["methods"]
    for row, name in zip(rows, ["stl", "mtl", "rs", "fs", "efs"]):
        r = methods[name]
        p = {"stl": "-", "mtl": "100%"}.get(name) or f"{r['keep_ratio']:.0%}"
        rank = "-" if name == "stl" else f"{r['avg_rank']:.2f}"
        cells = [f"{r['test_mean'][m]:.4f}" for m in ("accuracy", "precision", "recall", "f1")]
        assert row[1] == p and row[-1] == rank and row[2::3][:4] == cells
    assert set(results["methods"]) == {"stl", "mtl", "rs", "fs", "efs"}
    fs = results["methods"]["fs"]
    assert fs["keep_ratio"] in (0.3, 0.7)
    assert len(fs["test_per_seed"]) == 2
    assert fs["mask_updates"][0][0]["churn"] is None and fs["mask_updates"][0][1]["churn"] is not None
    assert results["methods"]["stl"]["avg_rank"] is None
    for name in ("results.csv", "table.txt", "per_task_f1.png", "overlap_fs.png"):
        assert (out / name).stat().st_size > 0


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["run", "--methods", "fs,nope"], "unknown method(s) nope"),
        (["run", "--benchmark", "imagenet"], "imagenet"),
        (["run", "--keep-ratios", "0,0.5"], "keep_ratios"),
        (["run", "--epochs", "0"], "epochs"),
        (["run", "--device", "nonsense"], "device"),
        (
            [
                "run",
                "--benchmark",
                "dkl-mnist",
                "-o",
                "mnist_dir=/does/not/exist",
                "-o",
                "kmnist_dir=/x",
                "-o",
                "emnist_letters_dir=/y",
            ],
            "/does/not/exist",
        ),
    ],
)
def test_bad_options_give_one_line(args, needle, capsys, tmp_path):
    code = main([*args, "--out", str(tmp_path), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("fsmtl: error:") and needle in err and len(err.splitlines()) == 1


def test_help_and_console_script():
    done = subprocess.run([sys.executable, "-m", "fsmtl", "run", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "--keep-ratios" in done.stdout and "digits-attributes" in done.stdout
    listed = subprocess.run([sys.executable, "-m", "fsmtl", "benchmarks"], capture_output=True, text=True)
    assert "synthetic" in listed.stdout
