"""``fsmtl run`` as a researcher uses it: every misuse ends before training with one
``fsmtl: error: ...`` line and exit code 2; --overwrite; an interrupt keeps the finished runs;
--help, --version, ``fsmtl benchmarks`` and ``fsmtl info`` (also with the C++ extension missing)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import fsmtl.engine.trainer
from fsmtl.engine import checkpoint as ckpt
from fsmtl.run import experiment
from fsmtl.run.cli import build_parser, main
from fsmtl.strategies import METHODS

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--benchmark", "digits-attributes", "--epochs", "1", "--seeds", "0", "--keep-ratios", "0.5", "--no-progress"]
TINY_MASKED = [*TINY, "--warmup", "0", "--update-every", "1", "--samples", "32", "--hidden", "16"]


@pytest.fixture
def no_training(monkeypatch):
    """Any call to Trainer.fit fails the test: the checks must come before training."""

    def fit(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(fsmtl.engine.trainer.Trainer, "fit", fit)


def _one_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("fsmtl: error: ") and len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["-o", "flatten=maybe"], ["-o flatten=maybe", "expected true or false", "bool"]),
        (["-o", "label_noise=lots"], ["label_noise", "expected a number"]),
        (["-o", "nope=1"], ["no option 'nope'", "label_noise (float", "flatten (bool, default True)"]),
        (["--benchmark", "synthetic", "-o", "n_tasks=2.5"], ["n_tasks", "expected an integer"]),
        (["--benchmark", "cifar"], ["unknown benchmark 'cifar'", "digits-dkl", "shapes", "celeba", "cityscapes"]),
        (["--methods", "mtl,nope"], ["unknown method(s) nope", "choose from stl, mtl, ", "upgrad"]),
        (["--keep-ratios", "0,0.5"], ["keep_ratios"]),
        (["--epochs", "0"], ["epochs"]),
        (["--benchmark", "synthetic", "-o", "relatedness=1.5"], ["relatedness"]),
        (["--benchmark", "celeba", "-o", "attr_file=/no/a.txt", "-o", "image_dir=/no/dir", "-o", "attributes=Smiling"],
         ["not found: /no/"]),
    ],
)  # fmt: skip
def test_misuse_is_one_line_exit_2_before_training(args, needles, tmp_path, capsys, no_training):
    out = tmp_path / "new"
    assert main(["run", *TINY, *args, "--out", str(out)]) == 2
    err = _one_error(capsys)
    for needle in needles:
        assert needle in err
    assert not (out / "results.json").exists()


def test_missing_optional_packages_are_refused_before_training(tmp_path, capsys, monkeypatch, no_training):
    needy = dataclasses.replace(METHODS["mtl"], name="needy", requires=("fsmtl_no_such_package_xyz",))
    monkeypatch.setitem(METHODS, "needy", needy)
    assert main(["run", *TINY, "--methods", "mtl,needy", "--out", str(tmp_path / "o")]) == 2
    err = _one_error(capsys)
    assert "method 'needy' needs fsmtl_no_such_package_xyz" in err and ".[peers]" in err
    assert not (tmp_path / "o").exists()  # a refused run creates nothing


def test_output_directory_checks(tmp_path, capsys, no_training):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    assert main(["run", *TINY, "--out", str(a_file)]) == 2
    assert "is a file, not a directory" in _one_error(capsys)
    assert main(["run", *TINY, "--out", str(a_file / "sub")]) == 2
    assert "is not writable" in _one_error(capsys)
    assert main(["run", *TINY, "--checkpoint-dir", str(a_file / "ck"), "--out", str(tmp_path / "o")]) == 2
    assert "--checkpoint-dir" in _one_error(capsys)
    assert not (tmp_path / "o" / "results.json").exists()


def test_an_earlier_run_is_refused_then_replaced_with_overwrite(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    old = {"results.json": "{}", "table.txt": "old", "overlap_fs.png": "old", "keep_ratio_curve.png": "old"}
    for name, text in old.items():  # an earlier run with FS
        (out / name).write_text(text)
    (out / "notes.txt").write_text("mine")  # not a file fsmtl writes: never deleted
    assert main(["run", *TINY_MASKED, "--methods", "mtl", "--out", str(out)]) == 2
    err = _one_error(capsys)
    assert "holds another run's results" in err and "results.json" in err and "--overwrite" in err
    assert all((out / name).read_text() == text for name, text in old.items())  # refused: nothing touched
    assert main(["run", *TINY_MASKED, "--methods", "mtl", "--out", str(out), "--overwrite"]) == 0
    assert not (out / "overlap_fs.png").exists()  # the earlier run's stale figures are gone
    assert not (out / "keep_ratio_curve.png").exists()
    assert set(json.loads((out / "results.json").read_text())["methods"]) == {"mtl"}
    assert (out / "per_task_f1.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "notes.txt").read_text() == "mine"


def test_a_stop_request_keeps_the_finished_runs(tmp_path, capsys, monkeypatch):
    """The stop flag SIGINT/SIGTERM set, raised once the first run is done: exit 130, one line,
    the finished run in --out/partial-results.json, no results.json."""
    real = experiment.train_once

    def train_once(*args, **kwargs):
        result = real(*args, **kwargs)
        ckpt.STOP.set()  # as the signal handler does; the next run stops after its first step
        return result

    monkeypatch.setattr(experiment, "train_once", train_once)
    out = tmp_path / "out"
    assert main(["run", *TINY_MASKED, "--methods", "mtl,fs", "--out", str(out)]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fsmtl: interrupted (stopped during fs seed 0 p=0.5)")
    assert "1 finished run(s) kept in" in err[0] and "--checkpoint-dir" in err[0]
    partial = json.loads((out / "partial-results.json").read_text())
    assert [(r["method"], r["seed"]) for r in partial["finished_runs"]] == [("mtl", 0)]
    assert len(partial["finished_runs"][0]["test"]) == 8 and "f1" in partial["finished_runs"][0]["test"][0]
    assert partial["interrupted_run"] == "fs seed 0 p=0.5" and partial["command"].startswith("fsmtl run")
    assert not (out / "results.json").exists()
    assert not ckpt.STOP.is_set()  # cleared for whatever runs next in this process


def test_sigterm_in_a_real_process_keeps_finished_runs_and_a_readable_log(tmp_path):
    out, log = tmp_path / "out", tmp_path / "log.txt"
    args = ["run", "--benchmark", "digits-attributes", "--methods", "mtl,fs", "--seeds", "0,1,2",
            "--keep-ratios", "0.5", "--epochs", "10", "--hidden", "16", "--warmup", "1", "--samples", "32",
            "--out", str(out)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with log.open("w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "fsmtl", *args], env=env, stdout=subprocess.PIPE, stderr=f)
        deadline = time.monotonic() + 120
        while "done," not in log.read_text():  # the first run has finished
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=120)
    text = log.read_text()
    assert proc.returncode == 130, text
    assert "\r" not in text  # a log file gets plain lines, no carriage-return redraws
    lines = text.strip().splitlines()
    assert lines[0].startswith("[1/6] mtl seed 0: started, ")
    assert any(line.startswith("[1/6] mtl seed 0: done, ") and "training" in line for line in lines)
    assert lines[-1].startswith("fsmtl: interrupted (stopped during ")
    assert str(out / "partial-results.json") in lines[-1]
    partial = json.loads((out / "partial-results.json").read_text())
    assert len(partial["finished_runs"]) >= 1 and partial["finished_runs"][0]["method"] == "mtl"
    assert not (out / "results.json").exists()


def test_every_option_has_help_and_default():
    parser = build_parser()
    run = next(a for a in parser._actions if a.dest == "command").choices["run"]
    for action in run._actions:
        if action.dest != "help":
            assert action.help, f"{action.option_strings} has no help"
    text = " ".join(run.format_help().split())  # argparse wraps lines anywhere
    for default in ("(default: 20)", "(default: 64)", "(default: stl,mtl,rs,fs)", "(default: fsmtl-results)"):
        assert default in text
    assert "(stl, mtl" not in text and "('stl'" not in text  # methods are listed as text, not as a tuple


def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip().startswith("fsmtl (fsmtl-kernels) 0.")


def test_benchmarks_lists_options_with_types_and_defaults(capsys):
    assert main(["benchmarks"]) == 0
    out = capsys.readouterr().out
    assert "    -o flatten (bool, default True)" in out
    assert "    -o relatedness (float, default 0.2)" in out
    assert "    -o n_train (int, default 20000)" in out
    assert "celeba (local files)" in out and "    -o attr_file (path, required)" in out
    assert "    -o limit (int or none, default None)" in out


def test_info_reports_versions_backends_and_threads(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for needle in ("fsmtl-kernels: 0.", "torch: ", "python: ", "cpu: ", "torch.get_num_threads(): ", "OMP_NUM_THREADS"):
        assert needle in out
    assert "  cpu: " in out and "reference" in out and "C++ extension (fsmtl_kernels._C):" in out


def test_info_names_the_recorded_build_error_when_the_extension_is_missing(tmp_path):
    """A copy of fsmtl_kernels without the compiled _C and with the file setup.py writes on a
    failed build, first on the path, _C unimportable: the import warning and ``fsmtl info`` name the
    compiler's error."""
    skip = shutil.ignore_patterns("_C*", "_build*", "__pycache__")
    shutil.copytree(ROOT / "fsmtl_kernels", tmp_path / "fsmtl_kernels", ignore=skip)
    error = "C++ build failed: csrc/topk_mask.cpp:12:5: error: 'frobnicate' was not declared in this scope"
    (tmp_path / "fsmtl_kernels" / "_build_error.txt").write_text(f"{error}\n\n  12 |     frobnicate();\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "OMP_NUM_THREADS": "1"}
    env.pop("FSMTL_CPP_JIT", None)
    # The editable install's finder would still find the real _C for the copy: block it as unbuilt.
    code = (
        "import sys; sys.modules['fsmtl_kernels._C'] = None; from fsmtl.run.cli import main; sys.exit(main(['info']))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"fsmtl_kernels._C was not built at install time: {error}" in done.stderr  # the import warning
    assert f"not available: fsmtl_kernels._C was not built at install time: {error}" in done.stdout
    assert "frobnicate();" in done.stdout  # the recorded lines follow
    cpu = next(line for line in done.stdout.splitlines() if line.startswith("  cpu: ") and "logical" not in line)
    assert cpu.strip().startswith("cpu: reference") and "cpp" not in cpu


def test_setup_records_the_compilers_first_error(tmp_path):
    """setup.py's build with a compiler that fails: the install goes on, and _build_error.txt in the
    built package starts with the compiler's first error line."""
    cxx = tmp_path / "cxx"
    cxx.write_text(
        '#!/bin/sh\nfor a in "$@"; do [ "$a" = "--version" ] && exec c++ --version; done\n'
        "echo \"csrc/x.cpp:3:1: error: expected ';' before '}' token\" >&2\nexit 1\n"
    )
    cxx.chmod(0o755)
    if shutil.which("c++") is None:
        pytest.skip("no c++ on PATH to answer --version")
    env = {**os.environ, "CXX": str(cxx), "MAX_JOBS": "1"}
    build = [sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(tmp_path / "lib"),
             "--build-temp", str(tmp_path / "tmp")]  # fmt: skip
    done = subprocess.run(build, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr  # a failed extension build never fails the install
    recorded = (tmp_path / "lib" / "fsmtl_kernels" / "_build_error.txt").read_text().splitlines()
    assert recorded[0] == "C++ build failed: csrc/x.cpp:3:1: error: expected ';' before '}' token"
    assert (tmp_path / "lib" / "fsmtl_kernels" / "_build.log").stat().st_size > 0


def test_a_second_signal_stops_at_once():
    from fsmtl.run.resume import stop_on_signals

    with stop_on_signals():
        os.kill(os.getpid(), signal.SIGINT)  # the first: stop after the current step
        time.sleep(0.01)
        assert ckpt.STOP.is_set()
        with pytest.raises(KeyboardInterrupt, match="second SIGTERM"):
            os.kill(os.getpid(), signal.SIGTERM)  # the second: now
            time.sleep(0.5)
    assert not ckpt.STOP.is_set()
