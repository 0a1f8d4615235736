"""torch.utils.data inputs: benchmarks as Datasets, CelebA decoded on the fly (uint8 until the
device), DataLoader workers, Fisher samples from a named dataset."""

import numpy as np
import pytest
import torch
from test_data import _write_celeba
from torch.utils.data import DataLoader

import fsmtl
from fsmtl.data import celeba, celeba_datasets, load_benchmark
from fsmtl.models import build_model
from fsmtl.strategies import EqualWeighting, FisherSparse, MaskSchedule


def test_celeba_datasets_hold_the_same_images_as_uint8(tmp_path):
    attr, image_dir, _ = _write_celeba(tmp_path)
    bench = celeba(attr, image_dir, ["Smiling", "Male"], image_size=8, val_fraction=0.25, test_fraction=0.25)
    tasks, sets = celeba_datasets(
        attr, image_dir, ["Smiling", "Male"], image_size=8, val_fraction=0.25, test_fraction=0.25
    )
    assert (
        tasks == bench.tasks
        and [len(sets[s]) for s in ("train", "val", "test")]
        == bench.train.sizes[:1] + bench.val.sizes[:1] + bench.test.sizes[:1]
    )
    image, targets = sets["train"][0]
    assert image.dtype == torch.uint8 and image.shape == (3, 8, 8)
    assert [float(t) for t in targets] == [float(bench.train.targets[0][0]), float(bench.train.targets[1][0])]
    # The benchmark standardizes per channel: undo it and compare with the decoded image in [0, 1].
    from fsmtl.data._split import standardize

    train = torch.stack([sets["train"][i][0] for i in range(len(sets["train"]))]).float() / 255
    np.testing.assert_array_equal(standardize(train, dims=(0, 2, 3))[0].numpy(), bench.train.inputs[0].numpy())


def test_training_from_lazily_decoded_celeba_with_workers(tmp_path):
    attr, image_dir, _ = _write_celeba(tmp_path)
    tasks, sets = celeba_datasets(
        attr, image_dir, ["Smiling", "Male"], image_size=8, val_fraction=0.25, test_fraction=0.25
    )
    trunk = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 8), torch.nn.ReLU())
    model = fsmtl.MultiTaskModel(trunk, [torch.nn.Linear(8, 1) for _ in tasks])
    trainer = fsmtl.Trainer(
        model,
        tasks,
        FisherSparse(0.5, samples=4, schedule=MaskSchedule(1, 1)),
        torch.optim.SGD(model.parameters(), 0.1),
    )
    trainer.fit(sets["train"], epochs=2, batch_size=2, num_workers=1, val=sets["val"])
    assert trainer.global_step == 2 * -(-len(sets["train"]) // 2) and len(trainer.history["mask_updates"]) == 1
    assert set(trainer.evaluate(DataLoader(sets["test"], batch_size=3))[0]) == {"accuracy", "precision", "recall", "f1"}


def test_builtin_benchmark_datasets_train_like_the_split():
    bench = load_benchmark("digits-dkl")  # heterogeneous: one dataset per task
    sets = bench.datasets("train")
    assert len(sets) == 3 and [len(d) for d in sets] == bench.train.sizes
    x, y = sets[1][5]
    assert torch.equal(x, bench.train.inputs[1][5]) and torch.equal(y, bench.train.targets[1][5])
    torch.manual_seed(0)
    model = build_model(bench, hidden=16)
    trainer = fsmtl.Trainer(
        model, bench.tasks, EqualWeighting(), torch.optim.SGD(model.parameters(), 0.1), homogeneous=False
    )
    trainer.fit(sets, epochs=1, batch_size=64, fisher_data=bench.train)
    assert trainer.global_step == -(-max(bench.train.sizes) // 64)
    assert trainer.evaluate(bench.datasets("test")) == trainer.evaluate(bench.test)
    with pytest.raises(ValueError, match="split"):
        bench.datasets("dev")


def test_cityscapes_datasets_read_the_same_arrays_lazily(tmp_path):
    from test_data import _write_cityscapes

    from fsmtl.data import cityscapes, cityscapes_datasets
    from fsmtl.data._split import standardize

    _write_cityscapes(tmp_path, {"train": 10, "val": 3})
    bench = cityscapes(tmp_path, val_fraction=0.2)
    tasks, sets = cityscapes_datasets(tmp_path, val_fraction=0.2)
    assert tasks == bench.tasks
    for name in ("train", "val", "test"):
        split, ds = getattr(bench, name), sets[name]
        items = [ds[i] for i in range(len(ds))]
        assert torch.equal(torch.stack([y[0] for _, y in items]), split.targets[0])
        assert torch.equal(torch.stack([y[1] for _, y in items]), split.targets[1])
    train = torch.stack([x for x, _ in (sets["train"][i] for i in range(len(sets["train"])))])
    assert torch.equal(standardize(train, dims=(0, 2, 3))[0], bench.train.inputs[0])
