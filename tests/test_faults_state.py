"""Fault injection into what a run reads back: damaged checkpoints of several kinds, foreign
checkpoints and results (another width, another learning rate, another strategy), a damaged
``run.json`` or finished result, and ``Trainer.load_state_dict`` with a state that does not fit
(the trainer is exactly as before). Each asserts that the message names the file and the cause,
and that nothing finished is lost."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from torch import nn

import fsmtl
from fsmtl.data import Split
from fsmtl.engine import checkpoint as ckpt
from fsmtl.run.cli import main
from fsmtl.strategies import FisherSparse, MaskSchedule
from fsmtl.strategies.weighting.gradnorm import GradNorm
from fsmtl.tasks import Task

TASKS = [Task("a", "binary", 1), Task("b", "regression", 1)]
EPOCHS, BATCH = 3, 16  # 3 steps per epoch: checkpoints 1..9


def build(width: int = 12, lr: float = 1e-2, strategy=None):
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(6, width), nn.ReLU(), nn.Linear(width, 8), nn.ReLU())
    model = fsmtl.MultiTaskModel(trunk, [nn.Linear(8, 1), nn.Linear(8, 1)])
    strategy = strategy or FisherSparse(0.5, samples=16, schedule=MaskSchedule(warmup=1, every=1))
    return fsmtl.Trainer(model, TASKS, strategy, torch.optim.Adam(model.parameters(), lr=lr), seed=3)


def data() -> Split:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 6, generator=g)
    return Split([x] * 2, [(x[:, 0] > 0).float(), x[:, 1] * 0.5])


def everything(trainer) -> dict:
    """The whole state, cloned, to compare a trainer before and after."""
    return {"state": trainer.state_dict(), "bound": trainer.strategy_bound, "hooks": _hooks(trainer.model)}


def _hooks(model) -> list:
    return [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()]


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if hasattr(a, "dtype") and hasattr(a, "shape"):  # numpy's RNG state
        return bool((a == b).all())
    return a == b


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run checkpointed after every step, and its final parameters."""
    directory = tmp_path_factory.mktemp("ckpts")
    trainer = build()
    trainer.fit(data(), epochs=EPOCHS, batch_size=BATCH, checkpoint_dir=directory, checkpoint_every=1,
                checkpoint_unit="step", keep_last=100, progress=None)  # fmt: skip
    return directory, [p.detach().clone() for p in trainer.model.parameters()]


def _garbage(raw: bytes) -> bytes:
    return bytes(range(256)) * 20


def _truncated(raw: bytes) -> bytes:
    return raw[: len(raw) // 2]


def _empty(raw: bytes) -> bytes:
    return b""


def _flipped_tensor_byte(raw: bytes) -> bytes:
    """One byte of a weight changed: torch still loads it (no checksum of its own)."""
    out = bytearray(raw)
    out[len(out) // 2] ^= 0x40
    return bytes(out)


def _not_a_state(raw: bytes) -> bytes:
    """A sound file of fsmtl's that holds something else than a Trainer state."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        return ckpt.atomic_save([1, 2, 3], f"{d}/x.pt").read_bytes()


DAMAGE = {
    "garbage bytes": (_garbage, "no checksum trailer"),
    "truncated": (_truncated, "no checksum trailer"),
    "empty": (_empty, "empty"),
    "a flipped byte": (_flipped_tensor_byte, "checksum mismatch"),
    "not a Trainer state": (_not_a_state, "holds a list, not a fsmtl Trainer state"),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_an_unreadable_checkpoint_is_skipped_for_the_next_older(run, tmp_path, kind):
    """The newest checkpoint damaged (each way): a warning names it and why, the one before is
    loaded, and the resumed run ends with the parameters of the run never damaged."""
    source, final = run
    for step in (5, 6):
        shutil.copy(source / f"ckpt-{step:09d}.pt", tmp_path)
    newest = tmp_path / "ckpt-000000006.pt"
    damage, why = DAMAGE[kind]
    newest.write_bytes(damage(newest.read_bytes()))
    trainer = build()
    with pytest.warns(UserWarning, match=rf"{newest} is unreadable \({why}.*; skipped, trying the next older"):
        assert trainer.resume(tmp_path)
    assert trainer.global_step == 5
    trainer.fit(data(), epochs=EPOCHS - trainer.epoch, batch_size=BATCH, progress=None)
    assert all(torch.equal(p, q) for p, q in zip(trainer.model.parameters(), final))


def test_when_no_checkpoint_is_readable_the_warning_says_training_restarts(run, tmp_path):
    source, _ = run
    for step in (2, 3):
        (tmp_path / f"ckpt-{step:09d}.pt").write_bytes(_truncated((source / f"ckpt-{step:09d}.pt").read_bytes()))
    trainer = build()
    restart = r"none of the 2 checkpoint\(s\) in .* is readable: training restarts from step 0"
    with pytest.warns(UserWarning, match=restart):
        assert not trainer.resume(tmp_path)
    assert trainer.global_step == 0


@pytest.mark.parametrize(
    ("other", "named"),
    [
        ({"width": 16}, r"parameter trunk\.0\.weight 16x6 float32 \(here 12x6 float32\)"),
        ({"lr": 0.1}, r"optimizer lr 0\.1 \(here 0\.01\)"),
        ({"strategy": GradNorm()}, r"strategy GradNorm \(here FisherSparse\)"),
    ],
    ids=["another width", "another learning rate", "another strategy"],
)
def test_a_foreign_checkpoint_is_refused_naming_each_difference(run, tmp_path, other, named):
    """A checkpoint of another run copied in: refused (not skipped) in one line naming the file and
    each differing setting, before anything of the trainer changes."""
    foreign = build(**other)
    foreign.fit(data(), epochs=1, batch_size=BATCH, checkpoint_dir=tmp_path, checkpoint_every=1, progress=None)
    trainer = build()
    before = everything(trainer)
    with pytest.raises(ValueError, match=rf"^{tmp_path}/ckpt-000000003\.pt: the state is of another run: .*{named}"):
        trainer.resume(tmp_path)
    assert same(everything(trainer), before)


@pytest.mark.parametrize("part", ["model", "optimizer", "strategy", "scheduler"])
def test_load_state_dict_changes_nothing_when_a_part_does_not_fit(run, part):
    """A state whose fingerprint matches but one part does not fit (another model's weights, an
    optimizer state of other shapes, another strategy's state, a scheduler this trainer lacks): the
    error names the part, and the trainer is exactly as before, bound or not."""
    source, _ = run
    state = ckpt.read_state(source / "ckpt-000000004.pt")
    if part == "model":
        state["model"]["trunk.0.weight"] = torch.zeros(3, 6)
        match = r"the model state does not fit this model: trunk\.0\.weight is \[3, 6\]"
    elif part == "optimizer":
        state["optimizer"]["state"][0]["exp_avg"] = torch.zeros(2, 2)
        match = r"the optimizer state's exp_avg of parameter 0 is \[2, 2\]"
    elif part == "strategy":
        state["strategy"] = GradNorm().state_dict()
        match = r"the strategy state has keys \['initial_losses', 'weights'\]"
    else:
        state["scheduler"] = {"last_epoch": 3}
        match = r"the state has scheduler, this trainer not"
    for fitted in (False, True):
        trainer = build()
        if fitted:
            trainer.fit(data(), epochs=2, batch_size=BATCH, progress=None)
        before = everything(trainer)
        with pytest.raises(ValueError, match=match):
            trainer.load_state_dict(state)
        assert same(everything(trainer), before), (part, fitted)


@pytest.mark.parametrize("late", ["strategy records", "numpy RNG state"])
def test_a_part_that_fails_while_loading_is_rolled_back(run, late):
    """The last line of defence: a part that passes the checks but fails while loading, after other
    parts changed (the strategy's masks and generator, changed in place, then its update records;
    or the model, optimizer and strategy, then the global RNG state): the trainer is as it was."""
    source, _ = run
    state = ckpt.read_state(source / "ckpt-000000007.pt")
    if late == "strategy records":
        state["strategy"]["updates"] = [1]  # after the masks and the generator are set
    else:
        state["rng"]["global"]["numpy"] = ("MT19937", "not a state")  # after everything but counters
    trainer = build()
    trainer.fit(data(), epochs=2, batch_size=BATCH, progress=None)
    before = everything(trainer)
    with pytest.raises((TypeError, ValueError, IndexError)):
        trainer.load_state_dict(state)
    assert same(everything(trainer), before)


# ------------------------------------------------------------------------------ the command

ARGS = [
    "run", "--benchmark", "synthetic", "-o", "n_samples=120", "-o", "n_tasks=2", "--methods", "mtl", "--seeds", "0",
    "--epochs", "2", "--samples", "8", "--batch-size", "16", "--no-progress",
]  # fmt: skip


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished run of width 8 and one of width 16, each with its checkpoint directory."""
    base = tmp_path_factory.mktemp("finished")
    for width in (8, 16):
        assert main([*ARGS, "--hidden", str(width), "--out", str(base / f"out{width}"),
                     "--checkpoint-dir", str(base / f"ck{width}")]) == 0  # fmt: skip
    return base


def _copy(finished, tmp_path, width: int = 8):
    ck = tmp_path / "ck"
    shutil.copytree(finished / f"ck{width}", ck)
    run = json.loads((ck / "run.json").read_text())
    run["out"] = str(tmp_path / "out")
    (ck / "run.json").write_text(json.dumps(run))
    return ck


def test_a_foreign_result_is_refused_before_training(finished, tmp_path, capsys, monkeypatch):
    """A finished result of a wider run copied into another's checkpoint directory: --resume stops
    before training, naming the file and the differing setting."""
    ck = _copy(finished, tmp_path)
    shutil.copy(finished / "ck16/runs/mtl-p1-s0-2tasks/result.pt", ck / "runs/mtl-p1-s0-2tasks/result.pt")
    monkeypatch.setattr(fsmtl.Trainer, "fit", lambda *a, **k: pytest.fail("training started"))
    assert main(["run", "--resume", str(ck)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"fsmtl: error: {ck}/runs/mtl-p1-s0-2tasks/result.pt is of another run: setting hidden 16 (here 8)"


def test_a_damaged_result_is_trained_again_with_a_warning(finished, tmp_path):
    ck = _copy(finished, tmp_path)
    result = ck / "runs/mtl-p1-s0-2tasks/result.pt"
    raw = result.read_bytes()
    result.write_bytes(raw[:-200] + bytes(200))
    with pytest.warns(UserWarning, match=rf"{result} is unreadable \(.*\); the run is trained again"):
        assert main(["run", "--resume", str(ck), "--no-progress"]) == 0
    expected = json.loads((finished / "out8/results.json").read_text())
    got = json.loads((tmp_path / "out/results.json").read_text())
    assert got["methods"] == expected["methods"]  # trained again, bit for bit
    ckpt.load_verified(result)


def test_a_damaged_run_json_is_named(finished, tmp_path, capsys):
    ck = _copy(finished, tmp_path)
    (ck / "run.json").write_text('{"benchmark": "synthetic", "hidden": 8,')
    assert main(["run", "--resume", str(ck)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"fsmtl: error: --resume {ck}: {ck}/run.json is unreadable (") and len(err.splitlines()) == 1


def test_a_changed_setting_in_run_json_does_not_pass_for_the_run(finished, tmp_path, capsys):
    """run.json's settings edited (or a digit flipped) disagree with its own fingerprint: refused,
    naming the setting."""
    ck = _copy(finished, tmp_path)
    run = json.loads((ck / "run.json").read_text())
    run["lr"] = 0.009
    (ck / "run.json").write_text(json.dumps(run))
    assert main(["run", "--resume", str(ck)]) == 2
    assert f"--resume {ck} is of another run: setting lr 0.001 (here 0.009)" in capsys.readouterr().err


def test_trailing_bytes_after_a_checkpoint_still_load_in_torch(tmp_path):
    """The checksum trailer relies on torch.load reading a zip with bytes after its end."""
    path = ckpt.atomic_save({"x": torch.arange(3.0)}, tmp_path / "x.pt")
    assert path.read_bytes()[-80:].count(ckpt.TRAILER) == 1
    assert torch.equal(torch.load(path, weights_only=False)["x"], torch.arange(3.0))
