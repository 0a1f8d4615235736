"""Fault injection into the data: every failure that would come mid-run or after it is found before
the first training step (no parameter changes), in one message that names the split, the task and
the file: a NaN in the test split of files on disk, an empty file, an empty split, a one-shot
iterator, a BatchNorm trunk whose last batch has one sample, a parameter frozen after the model was
built, a model of another dtype than its inputs, a NaN in validation data given as a dataset, and a
mid-epoch resume with another batch size."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_data import _write_cityscapes, _write_set
from torch import nn

import fsmtl
from fsmtl.data import Benchmark, Split, SplitDataset
from fsmtl.run.cli import main
from fsmtl.run.experiment import ExperimentConfig, run_experiment
from fsmtl.strategies import FisherSparse, MaskSchedule
from fsmtl.tasks import Task

TASKS = [Task("a", "binary", 1), Task("b", "regression", 1)]


@pytest.fixture
def no_training(monkeypatch):
    monkeypatch.setattr(fsmtl.Trainer, "_train_step", lambda *a, **k: pytest.fail("a training step started"))


def split(n: int = 33, features: int = 6, seed: int = 0) -> Split:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    return Split([x] * 2, [(x[:, 0] > 0).float(), x[:, 1] * 0.5])


def trainer(trunk: nn.Module | None = None, width: int = 8) -> fsmtl.Trainer:
    torch.manual_seed(0)
    trunk = trunk if trunk is not None else nn.Sequential(nn.Linear(6, width), nn.ReLU())
    model = fsmtl.MultiTaskModel(trunk, [nn.Linear(width, 1), nn.Linear(width, 1)])
    strategy = FisherSparse(0.5, samples=8, schedule=MaskSchedule(warmup=0, every=1))
    return fsmtl.Trainer(model, TASKS, strategy, torch.optim.SGD(model.parameters(), lr=0.1))


def params(t: fsmtl.Trainer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in t.model.parameters()]


def test_a_nan_in_the_test_files_is_named_before_training(tmp_path, capsys, no_training):
    """A NaN pixel in one test image of Cityscapes arrays: ``fsmtl run`` stops before training with
    one line naming the benchmark, the test split, its folder and the task (it used to surface after
    the whole training, naming neither)."""
    _write_cityscapes(tmp_path, {"train": 6, "val": 2})
    image = np.load(tmp_path / "val" / "image" / "1.npy")
    image[2, 3, 1] = np.nan
    np.save(tmp_path / "val" / "image" / "1.npy", image)
    args = ["run", "--benchmark", "cityscapes", "-o", f"root={tmp_path}", "--methods", "mtl", "--seeds", "0",
            "--epochs", "1", "--no-progress", "--out", str(tmp_path / "out")]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"fsmtl: error: benchmark 'cityscapes' test split (from {tmp_path / 'val'}): inputs of task 'segmentation' "
        "contain NaN or infinity"
    )


def test_an_empty_file_is_named(tmp_path, capsys):
    """A well-formed IDX file with zero images (numpy's reduction error before): named."""
    from test_data import _write_idx

    for name, prefix, test, classes, offset in (("mnist", "", "t10k", 10, 0), ("kmnist", "", "t10k", 10, 0),
                                                ("emnist", "emnist-letters-", "test", 26, 1)):  # fmt: skip
        _write_set(tmp_path / name, prefix, test, classes, offset, False, 0)
    empty = tmp_path / "mnist" / "train-images-idx3-ubyte"
    _write_idx(empty, np.zeros((0, 28, 28), np.uint8))
    _write_idx(tmp_path / "mnist" / "train-labels-idx1-ubyte", np.zeros(0, np.uint8))
    args = ["run", "--benchmark", "dkl-mnist", "-o", f"mnist_dir={tmp_path / 'mnist'}",
            "-o", f"kmnist_dir={tmp_path / 'kmnist'}", "-o", f"emnist_letters_dir={tmp_path / 'emnist'}",
            "--no-progress", "--out", str(tmp_path / "out")]  # fmt: skip
    assert main(args) == 2
    assert capsys.readouterr().err.strip() == f"fsmtl: error: {empty}: holds no images (a well-formed but empty file)"


def test_an_empty_split_is_named_before_training(no_training):
    train, val = split(), split(seed=1)
    empty_val = Split([val.inputs[0][:0]] * 2, [y[:0] for y in val.targets])
    bench = Benchmark("mine", TASKS, True, (6,), train, empty_val, val)
    cfg = ExperimentConfig(methods=["mtl"], seeds=[0], epochs=1)
    with pytest.raises(ValueError, match=r"^benchmark 'mine' val split: task 'a' has no samples \(empty split\)$"):
        run_experiment(cfg, benchmark=bench)


def test_an_epoch_that_yields_no_batch_raises_instead_of_recording_a_loss():
    """A one-shot generator trains its first epoch; the second has nothing: an error, not a loss of 0."""
    data = split()
    batches = ((data.inputs[0][i : i + 8], [y[i : i + 8] for y in data.targets]) for i in range(0, 33, 8))
    t = trainer()
    with pytest.raises(ValueError, match=r"train: epoch 1 yielded no batch \(an iterator or generator is exhausted"):
        t.fit(batches, epochs=2, progress=None)
    assert len(t.history["loss"]) == 1 and t.epoch == 1  # epoch 0's loss only


def test_batchnorm_with_a_one_sample_last_batch_is_refused_before_training():
    """33 samples in batches of 16 leave a batch of one, where BatchNorm1d fails in training mode
    (torch raises mid-epoch, after parameters changed): refused before the first step, naming the
    layer; the parameters are untouched. A BatchNorm2d over 4x4 maps sees 16 values per channel and
    trains."""
    t = trainer(nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU()))
    before = params(t)
    with pytest.raises(
        ValueError, match=r"\(33 samples, global batch 16\), and BatchNorm layer trunk\.1 then sees one"
    ):
        t.fit(split(), epochs=1, batch_size=16, progress=None)
    assert all(torch.equal(p, q) for p, q in zip(params(t), before))
    t.fit(split(), epochs=1, batch_size=11, progress=None)  # 3 full batches: trains

    conv = nn.Sequential(nn.Unflatten(1, (1, 4, 4)), nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2), nn.Flatten(), nn.ReLU())
    images = split(features=16)
    t2 = trainer(conv, width=32)
    t2.fit(images, epochs=1, batch_size=16, progress=None)
    assert t2.global_step == 3


def test_a_parameter_frozen_after_the_model_was_built_is_named(no_training):
    t = trainer()
    t.model.trunk[0].weight.requires_grad_(False)
    with pytest.raises(ValueError, match=r"^trunk\.0\.weight got requires_grad=False after the MultiTaskModel was"):
        t.fit(split(), epochs=1, batch_size=16, progress=None)


def test_a_model_of_another_dtype_than_its_inputs_is_named(no_training):
    t = trainer()
    t.model.double()
    with pytest.raises(ValueError, match=r"train inputs are torch\.float32 but the model's parameter trunk\.0\.weight"):
        t.fit(split(), epochs=1, batch_size=16, progress=None)


def test_a_nan_in_validation_data_given_as_a_dataset_is_named_before_training(no_training):
    val = split(seed=2)
    val.inputs[0][3, 1] = float("nan")
    with pytest.raises(ValueError, match=r"^val: inputs of task 'a' contain NaN or infinity"):
        trainer().fit(split(), epochs=1, batch_size=16, val=SplitDataset(val), progress=None)


def test_a_mid_epoch_resume_with_another_batch_size_is_refused(tmp_path):
    t = trainer()
    t.fit(split(), epochs=1, batch_size=8, checkpoint_dir=tmp_path, checkpoint_every=2, checkpoint_unit="step",
          progress=None)  # fmt: skip
    resumed = trainer()
    resumed.load_state_dict(torch.load(tmp_path / "ckpt-000000002.pt", weights_only=False))
    with pytest.raises(
        ValueError, match=r"stopped epoch 0 after 2 steps of global batch 8; this fit has global batch 16"
    ):
        resumed.fit(split(), epochs=1, batch_size=16, progress=None)
