"""FSMTL in PyTorch Lightning (the real ``lightning`` package, CPU): masks on the schedule, logged
mask metrics, masks saved in and restored from Lightning checkpoints (a resumed run equals an
uninterrupted one), and Lightning's DDP strategy on 2 gloo ranks with identical masks."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

pl = pytest.importorskip("lightning.pytorch", reason="lightning is not installed (pip install lightning)")

MODULE = """
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fsmtl
from fsmtl.lightning import FSMTLModule
from fsmtl.tasks import task_loss

TASKS = [fsmtl.Task("smile", "binary", 1), fsmtl.Task("age", "regression", 1)]


def loader():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 6, generator=g)
    return DataLoader(TensorDataset(x, (x[:, 0] > 0).float(), x[:, 1] * 0.5), batch_size=8, shuffle=False)


class TwoTasks(FSMTLModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        trunk = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU())
        self.net = fsmtl.MultiTaskModel(trunk, [nn.Linear(16, 1) for _ in TASKS])
        self.fsmtl = fsmtl.FSMTL(self.net, TASKS, keep_ratio=0.4, warmup=1, every=1, samples=32)

    def task_losses(self, batch, batch_idx):
        x, *ys = batch
        return [task_loss(task, self.net(x, t), y) for t, (task, y) in enumerate(zip(TASKS, ys))]

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def trainer(epochs, root, **kwargs):
    import lightning.pytorch as pl

    return pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=pl.loggers.CSVLogger(root),
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=root, **kwargs)
"""


@pytest.fixture(scope="module")
def lit(tmp_path_factory):
    path = tmp_path_factory.mktemp("lit")
    (path / "lit_module.py").write_text(MODULE)
    sys.path.insert(0, str(path))
    import lit_module

    yield lit_module
    sys.path.remove(str(path))


def params(module):
    return [p.detach().clone() for p in module.parameters()]


def test_masks_on_schedule_logged_saved_and_resumed(lit, tmp_path):
    once = lit.TwoTasks()
    lit.trainer(3, tmp_path / "once").fit(once, lit.loader())
    assert [u["epoch"] for u in once.fsmtl.updates] == [1, 2]
    assert once.fsmtl.kept_fraction == pytest.approx([0.4, 0.4], abs=1e-2)
    metrics = (tmp_path / "once").rglob("metrics.csv")
    header = next(metrics).read_text().splitlines()[0]
    assert "fsmtl/kept/smile" in header and "fsmtl/churn/age" in header and "loss/smile_epoch" in header

    first = lit.TwoTasks()
    run = lit.trainer(2, tmp_path / "first")
    run.fit(first, lit.loader())
    ckpt = tmp_path / "two.ckpt"
    run.save_checkpoint(ckpt)
    assert torch.load(ckpt, weights_only=False)["fsmtl"]["masks"] is not None
    resumed = lit.TwoTasks()  # fresh: no masks until the checkpoint restores them
    lit.trainer(3, tmp_path / "second").fit(resumed, lit.loader(), ckpt_path=ckpt)
    assert resumed.fsmtl.masks == once.fsmtl.masks and resumed.fsmtl.updates == once.fsmtl.updates
    for a, b in zip(params(resumed), params(once)):
        assert torch.equal(a, b)


def test_lightning_ddp_on_two_gloo_ranks_keeps_identical_masks(tmp_path):
    (tmp_path / "lit_module.py").write_text(MODULE)
    script = tmp_path / "ddp.py"
    script.write_text(
        textwrap.dedent(f"""
        import json, sys, torch
        sys.path.insert(0, {str(tmp_path)!r})
        import lit_module as lit
        module = lit.TwoTasks()
        trainer = lit.trainer(3, {str(tmp_path / "root")!r}, devices=2, strategy="ddp")
        trainer.fit(module, lit.loader())
        out = {{"words": module.fsmtl.masks.words.tolist(), "params": [p.detach().reshape(-1).tolist() for p in
               module.parameters()], "updates": [u["epoch"] for u in module.fsmtl.updates]}}
        with open({str(tmp_path)!r} + f"/rank{{trainer.global_rank}}.json", "w") as f:
            json.dump(out, f)
    """)
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["words"] == ranks[1]["words"] and ranks[0]["updates"] == [1, 2]
    assert ranks[0]["params"] == ranks[1]["params"]  # the averaged update keeps the ranks in step
