"""Checkpoint and exact resume: in-process, in a fresh process, after kill -9 during training and
during a checkpoint write, after SIGINT of ``fsmtl run``; atomic files and keep-last-K."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fsmtl.engine import checkpoint as ckpt
from fsmtl.run.cli import main

# One definition of the run, executed here and in the child processes: a sparse strategy with
# forward masks (strategy RNG), dropout (global RNG), Adam and a per-step LR schedule.
BUILD = """
import torch
from torch import nn
import fsmtl
from fsmtl.data import Split
from fsmtl.tasks import Task
from fsmtl.strategies import FisherSparse, MaskSchedule

TASKS = [Task("a", "binary", 1), Task("b", "regression", 1), Task("c", "multiclass", 3)]

def build():
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Dropout(0.2), nn.Linear(12, 12), nn.ReLU())
    model = fsmtl.MultiTaskModel(trunk, [nn.Linear(12, k) for k in (1, 1, 3)])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.9)
    strategy = FisherSparse(0.5, samples=16, schedule=MaskSchedule(warmup=1, every=1), mask_forward=True)
    trainer = fsmtl.Trainer(model, TASKS, strategy, opt, seed=3, scheduler=sched, scheduler_interval="step")
    torch.manual_seed(7)  # the global stream dropout draws from
    return trainer

def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 6, generator=g)
    return Split([x] * 3, [(x[:, 0] > 0).float(), x[:, 1] * 0.5, (x[:, 2] > 0).long() + (x[:, 3] > 0).long()])

EPOCHS, BATCH = 4, 16  # 3 steps per epoch (the last one short), 12 steps
"""
ns: dict = {}
exec(BUILD, ns)
build, data, EPOCHS, BATCH = ns["build"], ns["data"], ns["EPOCHS"], ns["BATCH"]

CHILD_TIMEOUT = 120


def final_state(trainer):
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


def assert_same_run(trainer, ref):
    state, ref_state = final_state(trainer), ref["model"]
    assert state.keys() == ref_state.keys()
    for k in state:
        assert torch.equal(state[k], ref_state[k]), k
    assert trainer.history["loss"] == ref["history"]["loss"]
    assert [u["step"] for u in trainer.history["mask_updates"]] == [u["step"] for u in ref["history"]["mask_updates"]]
    assert trainer.optimizer.param_groups[0]["lr"] == ref["lr"]
    assert trainer.global_step == 12 and trainer.epoch == EPOCHS


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run, checkpointed after every step."""
    directory = tmp_path_factory.mktemp("ref")
    trainer = build()
    trainer.fit(data(), epochs=EPOCHS, batch_size=BATCH, checkpoint_dir=directory, checkpoint_every=1,
                checkpoint_unit="step", keep_last=100)  # fmt: skip
    plain = build()
    plain.fit(data(), epochs=EPOCHS, batch_size=BATCH)
    for a, b in zip(final_state(plain).values(), final_state(trainer).values()):
        assert torch.equal(a, b)  # writing checkpoints changes nothing
    return {
        "dir": directory,
        "model": final_state(trainer),
        "history": trainer.history,
        "lr": trainer.optimizer.param_groups[0]["lr"],
    }


def resume_and_finish(path):
    torch.manual_seed(12345)  # the checkpoint, not this, must decide every random draw from here on
    trainer = build()
    trainer.load_state_dict(torch.load(path, weights_only=False))
    trainer.fit(data(), epochs=EPOCHS - trainer.epoch, batch_size=BATCH)
    return trainer


@pytest.mark.parametrize("step", [1, 3, 4, 5, 11])
def test_resume_at_any_step_is_bit_identical(reference, step):
    # step 1: before the first mask; 3: at an epoch end; 4/5: mid-epoch with masks; 11: the last step.
    trainer = resume_and_finish(reference["dir"] / f"ckpt-{step:09d}.pt")
    assert_same_run(trainer, reference)


def test_keep_last_and_latest(tmp_path):
    trainer = build()
    trainer.fit(data(), epochs=2, batch_size=BATCH, checkpoint_dir=tmp_path, checkpoint_every=1,
                checkpoint_unit="step", keep_last=2)  # fmt: skip
    assert [p.name for p in ckpt.checkpoints(tmp_path)] == ["ckpt-000000005.pt", "ckpt-000000006.pt"]
    assert ckpt.load_latest(tmp_path)["counters"]["global_step"] == 6
    assert not list(tmp_path.glob("*.tmp"))


def test_load_state_dict_refuses_another_run():
    trainer = build()
    state = trainer.state_dict()
    state["tasks"] = ["x", "y", "z"]
    with pytest.raises(ValueError, match="tasks"):
        build().load_state_dict(state)
    with pytest.raises(ValueError, match="version"):
        build().load_state_dict({"model": {}})


def _child(script: str, tmp_path: Path) -> subprocess.Popen:
    path = tmp_path / "child.py"
    path.write_text(BUILD + script)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(path)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_resume_in_a_fresh_process_is_bit_identical(reference, tmp_path):
    out = tmp_path / "final.pt"
    script = f"""
trainer = build()
trainer.load_state_dict(torch.load({str(reference["dir"] / "ckpt-000000005.pt")!r}, weights_only=False))
trainer.fit(data(), epochs=EPOCHS - trainer.epoch, batch_size=BATCH)
torch.save({{"model": trainer.model.state_dict(), "loss": trainer.history["loss"]}}, {str(out)!r})
"""
    proc = _child(script, tmp_path)
    _, err = proc.communicate(timeout=CHILD_TIMEOUT)
    assert proc.returncode == 0, err.decode()
    result = torch.load(out, weights_only=False)
    for k, v in reference["model"].items():
        assert torch.equal(result["model"][k], v), k
    assert result["loss"] == reference["history"]["loss"]


def _wait_for(predicate, proc, timeout=CHILD_TIMEOUT):
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"child ended early: {proc.communicate()[1].decode()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the child")
        time.sleep(0.02)


def test_kill_9_during_training_leaves_a_resumable_directory(reference, tmp_path):
    directory = tmp_path / "ck"
    script = f"""
import time
class Slow:  # a progress object that slows each step, so the kill lands mid-run
    def update(self, n):
        time.sleep(0.2)
trainer = build()
trainer.fit(data(), epochs=EPOCHS, batch_size=BATCH, checkpoint_dir={str(directory)!r}, checkpoint_every=1,
            checkpoint_unit="step", keep_last=2, progress=Slow())
"""
    proc = _child(script, tmp_path)
    _wait_for(
        lambda: len(ckpt.checkpoints(directory)) >= 2 and ckpt.checkpoints(directory)[-1].name >= "ckpt-000000004.pt",
        proc,
    )
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=CHILD_TIMEOUT)
    assert proc.returncode == -signal.SIGKILL
    torch.manual_seed(999)
    trainer = build()
    assert trainer.resume(directory)
    assert 4 <= trainer.global_step < 12
    trainer.fit(data(), epochs=EPOCHS - trainer.epoch, batch_size=BATCH)
    assert_same_run(trainer, reference)


def test_kill_9_during_a_checkpoint_write_leaves_a_resumable_directory(reference, tmp_path):
    directory = tmp_path / "ck"
    marker = tmp_path / "writing"
    # The 5th checkpoint write stops after its temporary file holds data, before the rename.
    script = f"""
import os, time
import fsmtl.engine.checkpoint as ckpt
real_fsync, calls = os.fsync, [0]
def slow_fsync(fd):
    calls[0] += 1
    if calls[0] == 9:  # two fsyncs (file, directory) per checkpoint: this is the 5th file's
        open({str(marker)!r}, "w").close()
        time.sleep(600)
    real_fsync(fd)
ckpt.os.fsync = slow_fsync
trainer = build()
trainer.fit(data(), epochs=EPOCHS, batch_size=BATCH, checkpoint_dir={str(directory)!r}, checkpoint_every=1,
            checkpoint_unit="step", keep_last=3)
"""
    proc = _child(script, tmp_path)
    _wait_for(marker.exists, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=CHILD_TIMEOUT)
    tmp_files = list(directory.glob(".ckpt-*.tmp"))
    assert len(tmp_files) == 1 and tmp_files[0].stat().st_size > 0  # killed mid-write
    assert [p.name for p in ckpt.checkpoints(directory)][-1] == "ckpt-000000004.pt"
    trainer = build()
    assert trainer.resume(directory) and trainer.global_step == 4
    trainer.fit(data(), epochs=EPOCHS - trainer.epoch, batch_size=BATCH, checkpoint_dir=directory,
                checkpoint_every=1, checkpoint_unit="step")  # fmt: skip
    assert_same_run(trainer, reference)
    assert not list(directory.glob(".ckpt-*.tmp"))  # the next write cleans the leftover up


# ------------------------------------------------------------------------------- the command

CLI_ARGS = [
    "run", "--benchmark", "synthetic", "-o", "n_samples=200", "-o", "task_kind=binary", "--methods", "mtl,fs",
    "--seeds", "0,1", "--keep-ratios", "0.5", "--epochs", "30", "--warmup", "1", "--update-every", "2",
    "--samples", "16", "--hidden", "16", "--batch-size", "16", "--no-progress",
]  # fmt: skip


def _strip_timing(results: dict) -> dict:
    """Without the fields that say when, where and by which command the run was made."""
    results = dict(results)
    for key in ("seconds", "started_at", "ended_at", "environment", "command"):
        results.pop(key, None)
    return results


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli-ref")
    assert main([*CLI_ARGS, "--out", str(out)]) == 0
    return json.loads((out / "results.json").read_text())


def test_sigint_stops_checkpoints_and_resume_gives_the_same_results(uninterrupted, tmp_path):
    directory, out = tmp_path / "ck", tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    args = [*CLI_ARGS, "--out", str(out), "--checkpoint-dir", str(directory)]
    proc = subprocess.Popen([sys.executable, "-m", "fsmtl", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)  # fmt: skip
    # Interrupt once the first run is done and a later one has a checkpoint.
    _wait_for(lambda: any(directory.glob("runs/*/result.pt")) and any(directory.glob("runs/*/ckpt-*.pt")), proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=CHILD_TIMEOUT)
    lines = err.decode().strip().splitlines()
    assert proc.returncode == 130, err.decode()
    assert len(lines) == 1 and lines[0].startswith("fsmtl: interrupted") and "--resume" in lines[0]
    partial = json.loads((directory / "partial-results.json").read_text())
    assert len(partial) >= 1
    assert not (out / "results.json").exists()
    # Omitting every option, or repeating one, resumes; a conflicting one is an error.
    assert main(["run", "--resume", str(directory), "--epochs", "31"]) == 2
    assert main(["run", "--resume", str(directory), "--epochs", "30", "--no-progress"]) == 0
    resumed = json.loads((out / "results.json").read_text())
    assert _strip_timing(resumed) == _strip_timing(uninterrupted)


def test_checkpoint_dir_refuses_an_existing_run(tmp_path, capsys):
    (tmp_path / "run.json").write_text("{}")
    assert main([*CLI_ARGS, "--checkpoint-dir", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["run", "--resume", str(tmp_path / "missing")]) == 2


def test_resume_mid_epoch_with_shuffling_per_task_dataloaders(tmp_path):
    """Heterogeneous tasks from the user's own shuffling DataLoaders (they draw from torch's global
    RNG, the shorter ones restart mid-epoch): resumed mid-epoch, training is bit-identical."""
    from torch.utils.data import DataLoader, TensorDataset

    split = data()
    loaders = [
        DataLoader(TensorDataset(split.inputs[t][:n], split.targets[t][:n]), batch_size=8, shuffle=True)
        for t, n in enumerate((40, 25, 13))
    ]

    def make():
        trainer = build()
        trainer.homogeneous = False
        return trainer

    full = make()
    full.fit(loaders, epochs=3, checkpoint_dir=tmp_path, checkpoint_every=1, checkpoint_unit="step", keep_last=100)
    resumed = make()
    torch.manual_seed(4321)
    resumed.load_state_dict(torch.load(tmp_path / "ckpt-000000007.pt", weights_only=False))
    assert (resumed.epoch, resumed.epoch_step) == (1, 2)
    resumed.fit(loaders, epochs=3 - resumed.epoch)
    for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    assert resumed.history["loss"] == full.history["loss"]


def test_a_warmup_covering_the_run_is_reported_and_amp_reaches_the_trainer(tmp_path):
    out = tmp_path / "o"
    args = ["run", "--benchmark", "synthetic", "-o", "n_samples=60", "--methods", "fs", "--seeds", "0",
            "--keep-ratios", "0.5", "--epochs", "2", "--warmup", "2", "--samples", "8", "--hidden", "8",
            "--amp", "bf16", "--no-progress", "--out", str(out)]  # fmt: skip
    with pytest.warns(UserWarning, match="covers the whole run"):
        assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["methods"]["fs"]["mask_used"] is False
    assert results["config"]["amp"] == "bf16"


def test_resume_of_a_torchjd_peer_is_bit_identical():
    pytest.importorskip("torchjd")
    from torch import nn

    import fsmtl
    from fsmtl.strategies.weighting.jacobian import JacobianAggregation

    tasks = ns["TASKS"]

    def make():
        torch.manual_seed(0)
        trunk = nn.Sequential(nn.Linear(6, 12), nn.ReLU())
        model = fsmtl.MultiTaskModel(trunk, [nn.Linear(12, k) for k in (1, 1, 3)])
        return fsmtl.Trainer(model, tasks, JacobianAggregation("mgda"), torch.optim.SGD(model.parameters(), 0.1))

    full = make()
    full.fit(data(), epochs=2, batch_size=BATCH)
    half = make()
    half.fit(data(), epochs=1, batch_size=BATCH)
    state = half.state_dict()
    resumed = make()
    resumed.load_state_dict(state)
    resumed.fit(data(), epochs=1, batch_size=BATCH)
    for a, b in zip(full.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)
