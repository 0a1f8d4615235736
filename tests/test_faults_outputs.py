"""Fault injection into ``fsmtl run``'s writes: kill -9 while writing each file, a full file system
(the kernel's file size limit, and a writer failing with ENOSPC), concurrent runs on one directory.
Each test asserts that nothing finished is lost (the finished runs are read back or kept where the
message says), that no file is left torn under its final name, and that the one message names the
cause. Faults come from ``tests/faults/sitecustomize.py`` in real processes, or from a patched
``os.fsync`` in this one."""

from __future__ import annotations

import csv
import errno
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fsmtl.engine import checkpoint as ckpt
from fsmtl.run.cli import main

FAULTS = Path(__file__).parent / "faults"
# Two runs (MTL and FS), two epochs each: about two seconds of training.
ARGS = [
    "run", "--benchmark", "synthetic", "-o", "n_samples=120", "-o", "n_tasks=2", "--methods", "mtl,fs", "--seeds", "0",
    "--keep-ratios", "0.5", "--epochs", "2", "--warmup", "1", "--update-every", "1", "--samples", "8",
    "--hidden", "8", "--batch-size", "16", "--no-progress",
]  # fmt: skip
OUTPUTS = ["table.txt", "results.csv", "per_task_mse.png", "results.json"]  # in the order they are written
VOLATILE = ("seconds", "started_at", "ended_at", "environment", "command")


def numbers(results: dict) -> dict:
    return {k: v for k, v in results.items() if k not in VOLATILE}


def fsmtl(args, fault: str = "", mark: Path | None = None, preexec=None) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", FSMTL_FAULT=fault, FSMTL_FAULT_MARK=str(mark or ""),
               PYTHONPATH=os.pathsep.join([str(FAULTS), os.environ.get("PYTHONPATH", "")]))  # fmt: skip
    return subprocess.Popen([sys.executable, "-m", "fsmtl", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=preexec)  # fmt: skip


def assert_intact(directory: Path) -> None:
    """Every file under a final name is complete: JSON parses, CSV has its header, PNG its end chunk,
    a checkpoint or result passes its checksum."""
    for path in directory.rglob("*"):
        if not path.is_file() or path.name.startswith("."):
            continue
        data = path.read_bytes()
        if path.suffix == ".json":
            json.loads(data)
        elif path.suffix == ".csv":
            assert next(csv.reader(data.decode().splitlines()))[0] == "method", path
        elif path.suffix == ".png":
            assert data.startswith(b"\x89PNG") and data[-12:-4] == b"\x00\x00\x00\x00IEND", path
        elif path.suffix == ".pt":
            ckpt.load_verified(path)
        elif path.suffix == ".txt":
            assert data.endswith(b"\n"), path


def one_error(capsys) -> str:
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "fsmtl: error:" in line]
    assert len(err) == 1, err
    return err[0]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("reference")
    assert main([*ARGS, "--out", str(out)]) == 0
    return numbers(json.loads((out / "results.json").read_text()))


# ------------------------------------------------------------------------------ kill -9

KILLED = ["ckpt-", "result.pt", *OUTPUTS]  # the first checkpoint, the first finished result, each output


@pytest.fixture(scope="module")
def killed(tmp_path_factory) -> dict:
    """``fsmtl run --checkpoint-dir`` killed (SIGKILL) while writing each file, all at once."""
    base = tmp_path_factory.mktemp("killed")
    procs = {}
    for name in KILLED:
        d = base / name
        args = [*ARGS, "--out", str(d / "out"), "--checkpoint-dir", str(d / "ck")]
        procs[name] = fsmtl(args, f"kill-writing:{name}", mark=base / f"{name}.fired")
    for proc in procs.values():
        proc.communicate(timeout=240)
    return {name: (base / name, proc.returncode, base / f"{name}.fired") for name, proc in procs.items()}


@pytest.mark.parametrize("name", KILLED)
def test_kill_9_while_writing_loses_nothing_finished(killed, reference, name):
    """Killed while writing ``name``: no file is torn, every run that had finished is read back, and
    ``--resume`` (taking over the dead process's locks with a warning) ends with the results of a
    run never killed."""
    directory, returncode, fired = killed[name]
    assert fired.exists() and returncode == -signal.SIGKILL
    assert_intact(directory)
    out, ck = directory / "out", directory / "ck"
    assert not (out / "results.json").exists()  # written last: absent means "not complete"
    finished = len(list(ck.glob("runs/*/result.pt")))
    assert finished == (2 if name in OUTPUTS else 0)  # the first result is the one killed, or none yet
    with pytest.warns(UserWarning, match=r"taking over the lock of fsmtl run \(pid \d+\), which is no longer"):
        assert main(["run", "--resume", str(ck), "--no-progress"]) == 0
    assert numbers(json.loads((out / "results.json").read_text())) == reference
    assert not list(out.glob(".*.tmp"))


# ------------------------------------------------------------------------------ full disk


def _fsync_fails_for(names, error=errno.ENOSPC):
    real = os.fsync

    def fsync(fd):
        target = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
        if any(target.startswith(f".{n}") for n in names):
            raise OSError(error, os.strerror(error))
        return real(fd)

    return fsync


def test_a_full_disk_while_writing_results_json_keeps_every_run(tmp_path, reference, capsys, monkeypatch):
    """``results.json`` fails with ENOSPC after all the training: one line names it and the cause
    and where the finished runs are (the checkpoint directory's partial results, holding the whole
    results); no torn file; ``--resume`` then writes the outputs without training again."""
    out, ck = tmp_path / "out", tmp_path / "ck"
    monkeypatch.setattr(os, "fsync", _fsync_fails_for(["results.json"]))
    assert main([*ARGS, "--out", str(out), "--checkpoint-dir", str(ck)]) == 1
    line = one_error(capsys)
    assert line == (
        f"fsmtl: error: cannot write {out}/results.json: No space left on device; 2 finished run(s) kept in "
        f"{ck}/partial-results.json; continue with: fsmtl run --resume {ck}"
    )
    kept = json.loads((ck / "partial-results.json").read_text())
    assert numbers(kept["results"]) == reference
    assert not (out / "results.json").exists() and not list(out.glob(".*.tmp"))
    assert_intact(tmp_path)
    monkeypatch.undo()
    assert main(["run", "--resume", str(ck), "--no-progress"]) == 0
    assert numbers(json.loads((out / "results.json").read_text())) == reference


def test_a_full_disk_everywhere_keeps_the_runs_in_the_temp_dir(tmp_path, reference, capsys, monkeypatch):
    """No --checkpoint-dir and nothing can be written to --out: the finished runs go to the system's
    temporary directory, and the line says so."""
    out = tmp_path / "out"
    monkeypatch.setattr(os, "fsync", _fsync_fails_for(["table.txt", "partial-results.json"]))
    assert main([*ARGS, "--out", str(out)]) == 1
    line = one_error(capsys)
    assert line.startswith(f"fsmtl: error: cannot write {out}/table.txt: No space left on device; 2 finished run(s)")
    kept = Path(line.split(" kept in ")[1])
    assert kept.parent != out and numbers(json.loads(kept.read_text())["results"]) == reference
    kept.unlink()
    assert not list(out.iterdir())  # no torn file, no temporary, no lock left


def test_the_kernels_file_size_limit_stops_a_run_with_one_line(tmp_path, capsys):
    """A real write failure from the kernel (RLIMIT_FSIZE: EFBIG past 20 kB, as a disk filling up;
    checkpoints only at the end of a run, which is smaller): the figures no longer fit after
    training; the run ends with exit 1 and one line naming the file and "File too large", the
    finished runs kept in the checkpoint directory."""
    out, ck = tmp_path / "out", tmp_path / "ck"

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    proc = fsmtl([*ARGS, "--out", str(out), "--checkpoint-dir", str(ck), "--checkpoint-every", "5"], preexec=limit)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 1, err
    lines = [line for line in err.splitlines() if line.startswith("fsmtl: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"fsmtl: error: cannot write {out}/per_task_mse.png: File too large; 2 finished run(s)")
    assert f"kept in {ck}/partial-results.json; continue with: fsmtl run --resume {ck}" in lines[0]
    assert len(list(ck.glob("runs/*/result.pt"))) == 2
    assert_intact(tmp_path)


# ------------------------------------------------------------------------------ concurrent runs


def test_a_second_run_on_a_directory_in_use_stops_before_training(tmp_path, reference, capsys):
    """While one ``fsmtl run`` trains, another on its --out, or resuming its --checkpoint-dir,
    stops at once naming the first one's pid; the first one finishes with its own results."""
    out, ck, mark = tmp_path / "out", tmp_path / "ck", tmp_path / "training"
    first = fsmtl([*ARGS, "--out", str(out), "--checkpoint-dir", str(ck)], "slow:0.2", mark=mark)
    deadline = time.monotonic() + 120
    while not mark.exists():
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()
        time.sleep(0.05)
    try:
        assert main([*ARGS, "--out", str(out)]) == 2
        assert one_error(capsys) == f"fsmtl: error: --out {out} is in use by fsmtl run (pid {first.pid})"
        assert main(["run", "--resume", str(ck)]) == 2
        assert one_error(capsys) == f"fsmtl: error: --checkpoint-dir {ck} is in use by fsmtl run (pid {first.pid})"
        assert first.poll() is None  # the refusals came while it trained
    finally:
        _, err = first.communicate(timeout=240)
    assert first.returncode == 0, err
    assert numbers(json.loads((out / "results.json").read_text())) == reference
    assert not (out / ".fsmtl.lock").exists() and not (ck / ".fsmtl.lock").exists()


def test_free_space_below_what_the_run_writes_is_warned_before_training(tmp_path, monkeypatch):
    import shutil

    from fsmtl.run import outputs

    monkeypatch.setattr(outputs.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 1000))
    with pytest.warns(UserWarning, match=r"--out .* and --checkpoint-dir .*: 0\.0 MB free, but this run writes up"):
        assert main([*ARGS, "--epochs", "1", "--methods", "mtl", "--out", str(tmp_path / "o"),
                     "--checkpoint-dir", str(tmp_path / "c")]) == 0  # fmt: skip


def test_a_study_on_a_folder_in_use_stops_at_once(tmp_path, capsys):
    """``fsmtl study`` locks its --out too: its cells are shared between invocations."""
    from fsmtl.run.outputs import DirectoryLock

    spec = tmp_path / "spec.json"
    grid = [{"benchmark": "synthetic", "methods": ["mtl"], "keep_ratios": [0.5]}]
    spec.write_text(json.dumps({"name": "x", "seeds": [0], "select_seeds": [100], "settings": {}, "grid": grid}))
    out = tmp_path / "study"
    out.mkdir()
    with DirectoryLock(out, "--out", "fsmtl study"):
        assert main(["study", str(spec), "--out", str(out)]) == 2
    assert one_error(capsys) == f"fsmtl: error: --out {out} is in use by fsmtl study (pid {os.getpid()})"
    assert not (out / "cells").exists()  # stopped before any cell
