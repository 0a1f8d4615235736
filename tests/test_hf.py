"""FSMTL in the Hugging Face Trainer (the real ``transformers`` package, offline, CPU): masks on
the schedule, the FSMTL state in every checkpoint folder, a resumed run equal to an uninterrupted
one, and what it refuses before training."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install transformers)")
pytest.importorskip("accelerate", reason="the Hugging Face Trainer needs accelerate (pip install accelerate)")

import fsmtl  # noqa: E402
from fsmtl.data import Split  # noqa: E402
from fsmtl.hf import STATE_FILE, FSMTLTrainer  # noqa: E402
from fsmtl.tasks import task_loss  # noqa: E402

TASKS = [fsmtl.Task("smile", "binary", 1), fsmtl.Task("digit", "multiclass", 3)]


def data(n=48):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 6, generator=g)
    return x, [(x[:, 0] > 0).float(), (x[:, 1] > 0).long() + (x[:, 2] > 0).long()]


class Rows(Dataset):
    """What a Hugging Face data pipeline yields: one dict per example."""

    def __init__(self):
        self.x, self.ys = data()

    def __len__(self):
        return self.x.shape[0]

    def __getitem__(self, i):
        return {"x": self.x[i], "smile": self.ys[0][i], "digit": self.ys[1][i]}


def losses(model, batch):
    return [task_loss(task, model(batch["x"], t), batch[task.name]) for t, task in enumerate(TASKS)]


def build(tmp_path, epochs=3, **args):
    torch.manual_seed(0)
    net = fsmtl.MultiTaskModel(
        nn.Sequential(nn.Linear(6, 16), nn.ReLU()), [nn.Linear(16, t.num_outputs) for t in TASKS]
    )
    fs = fsmtl.FSMTL(net, TASKS, keep_ratio=0.5, warmup=1, every=1, samples=24)
    x, ys = data()
    arguments = dict(output_dir=str(tmp_path), num_train_epochs=epochs, per_device_train_batch_size=8,
                     learning_rate=0.05, save_strategy="epoch", report_to=[], use_cpu=True, seed=0,
                     remove_unused_columns=False, logging_strategy="no", disable_tqdm=True)  # fmt: skip
    arguments.update(args)
    return FSMTLTrainer(args=transformers.TrainingArguments(**arguments), train_dataset=Rows(), fsmtl=fs,
                        task_losses=losses, fisher_data=Split([x] * 2, ys))  # fmt: skip


def test_masks_on_schedule_saved_with_each_checkpoint_and_resumed(tmp_path):
    once = build(tmp_path / "once")
    once.train()
    assert [u["epoch"] for u in once.fsmtl.updates] == [1, 2]
    checkpoints = sorted((tmp_path / "once").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert len(checkpoints) == 3 and all((c / STATE_FILE).is_file() for c in checkpoints)

    resumed = build(tmp_path / "once")
    resumed.train(resume_from_checkpoint=str(checkpoints[1]))  # after epoch 2 (one mask update)
    assert resumed.fsmtl.masks == once.fsmtl.masks and resumed.fsmtl.updates == once.fsmtl.updates
    for a, b in zip(resumed.model.parameters(), once.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize(
    "args, fragment",
    [
        ({"gradient_accumulation_steps": 2}, "gradient_accumulation_steps=2"),
        ({"remove_unused_columns": True}, "remove_unused_columns=True"),
    ],
)
def test_what_cannot_work_is_refused_before_training(tmp_path, args, fragment):
    with pytest.raises(ValueError, match="FSMTLTrainer cannot train with") as info:
        build(tmp_path, **args)
    assert fragment in str(info.value)


def test_a_checkpoint_without_the_fsmtl_state_is_refused(tmp_path):
    (tmp_path / "checkpoint-3").mkdir()
    with pytest.raises(FileNotFoundError, match="fsmtl.pt"):
        build(tmp_path).train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
