"""Tests of fsmtl.data: the embedded benchmarks and the loaders of the paper's data (on files written here)."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from fsmtl.data import (
    ATTRIBUTES,
    BENCHMARKS,
    POSITIVE_RATES,
    Benchmark,
    Split,
    celeba,
    cityscapes,
    dkl_mnist,
    load_benchmark,
    read_idx,
    synthetic,
)
from fsmtl.data._split import standardize, three_way_split
from fsmtl.data.synthetic import task_directions
from fsmtl.tasks import Task

SPLITS = ("train", "val", "test")


def _rows(x: torch.Tensor) -> set[bytes]:
    return {row.numpy().tobytes() for row in x.reshape(x.shape[0], -1)}


# ---------------------------------------------------------------------------------------------
# containers and splitting


def test_three_way_split_disjoint_and_stratified():
    labels = np.repeat(np.arange(5), 20)
    train, val, test = three_way_split(100, val_fraction=0.2, test_fraction=0.2, seed=3, stratify=labels)
    assert len(train) == 60 and len(val) == 20 and len(test) == 20
    assert sorted(np.concatenate([train, val, test]).tolist()) == list(range(100))
    for part in (val, test):
        assert np.bincount(labels[part], minlength=5).tolist() == [4] * 5


def test_standardize_uses_train_statistics_only():
    train = torch.tensor([[0.0, 5.0], [2.0, 5.0], [4.0, 5.0]])
    other = torch.tensor([[100.0, 7.0]])
    tr, ot = standardize(train, other, dims=(0,))
    torch.testing.assert_close(tr.mean(0), torch.zeros(2))
    # Constant feature: std replaced by 1, so it becomes 0 in train and (7 - 5) / 1 elsewhere.
    std = torch.tensor(8.0 / 3.0).sqrt()
    torch.testing.assert_close(ot, torch.tensor([[(100.0 - 2.0) / std.item(), 2.0]]))


def test_containers_reject_inconsistent_data():
    x = torch.zeros(4, 3)
    good = Split([x, x], [torch.zeros(4), torch.zeros(4, dtype=torch.int64)])
    tasks = [Task("a", "binary", 1), Task("b", "multiclass", 3)]
    Benchmark("ok", tasks, True, (3,), good, good, good)
    with pytest.raises(ValueError, match="kind"):
        Task("a", "ranking", 1)
    with pytest.raises(ValueError, match="num_outputs"):
        Task("a", "binary", 2)
    with pytest.raises(ValueError, match="samples"):
        Split([x], [torch.zeros(3)])
    with pytest.raises(ValueError, match="float32"):
        Split([x.double()], [torch.zeros(4)])
    wrong_dtype = Split([x, x], [torch.zeros(4), torch.zeros(4)])
    with pytest.raises(ValueError, match="int64"):
        Benchmark("bad", tasks, True, (3,), wrong_dtype, good, good)
    two_tensors = Split([x, x.clone()], good.targets)
    with pytest.raises(ValueError, match="same input tensor"):
        Benchmark("bad", tasks, True, (3,), two_tensors, good, good)
    with pytest.raises(ValueError, match="input_shape"):
        Benchmark("bad", tasks, True, (4,), good, good, good)


def test_registry():
    assert list(BENCHMARKS) == [
        "digits-attributes",
        "digits-dkl",
        "synthetic",
        "shapes",
        "qm9",
        "dkl-mnist",
        "celeba",
        "celeba-groups",
        "cityscapes",
    ]
    assert [n for n, e in BENCHMARKS.items() if e.local_files] == ["dkl-mnist", "celeba", "celeba-groups", "cityscapes"]
    assert BENCHMARKS["celeba"].required == ["attr_file", "image_dir", "attributes"]
    assert BENCHMARKS["synthetic"].required == []
    with pytest.raises(ValueError, match=r"benchmark 'cityscapes' needs option root .*missing \['root'\]"):
        load_benchmark("cityscapes", limit=3)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['roots'\] for benchmark 'cityscapes'"):
        load_benchmark("cityscapes", roots="/data")
    with pytest.raises(ValueError, match="unknown benchmark 'celebb'"):
        load_benchmark("celebb")
    with pytest.raises(ValueError, match="relatednes"):
        load_benchmark("synthetic", relatednes=0.5)
    assert load_benchmark("synthetic", n_tasks=3, n_samples=50).num_tasks == 3


# ---------------------------------------------------------------------------------------------
# digits-attributes


def test_digits_attributes_layout():
    b = load_benchmark("digits-attributes")
    assert b.homogeneous and b.input_shape == (64,) and [t.name for t in b.tasks] == list(ATTRIBUTES)
    assert all(t.kind == "binary" and t.num_outputs == 1 for t in b.tasks)
    assert [getattr(b, s).sizes[0] for s in SPLITS] == [1077, 360, 360]
    for s in SPLITS:
        split = getattr(b, s)
        assert all(x is split.inputs[0] for x in split.inputs)
        assert split.inputs[0].dtype == torch.float32
        for y in split.targets:
            assert y.dtype == torch.float32 and set(y.unique().tolist()) <= {0.0, 1.0}
    # The bundled digits have no duplicate image, so disjoint index splits mean disjoint rows.
    rows = [_rows(getattr(b, s).inputs[0]) for s in SPLITS]
    assert sum(len(r) for r in rows) == 1797 == len(rows[0] | rows[1] | rows[2])
    x = b.train.inputs[0]
    varying = x.std(0) > 0
    torch.testing.assert_close(x.mean(0), torch.zeros(64), atol=1e-5, rtol=0)
    torch.testing.assert_close(x.std(0, unbiased=False)[varying], torch.ones(int(varying.sum())), atol=1e-4, rtol=0)
    assert b.val.inputs[0].mean(0).abs().max() > 1e-3  # val is scaled with train statistics, not its own


def test_digits_attributes_positive_rates_and_correlations():
    b = load_benchmark("digits-attributes", seed=0)
    rates = {t.name: b.train.targets[i].mean().item() for i, t in enumerate(b.tasks)}
    for name, rate in rates.items():
        assert abs(rate - POSITIVE_RATES[name]) < 0.03, name
        assert 0.25 < rate < 0.6, name
    y = torch.stack(b.train.targets, 1).numpy()
    corr = np.corrcoef(y.T)
    names = list(ATTRIBUTES)
    assert corr[names.index("is_large"), names.index("has_loop")] > 0.3  # related tasks
    assert corr[names.index("is_prime"), names.index("has_loop")] < -0.3  # conflicting tasks


def test_digits_attributes_determinism_seed_noise_and_shape():
    a, b = load_benchmark("digits-attributes", seed=1), load_benchmark("digits-attributes", seed=1)
    c = load_benchmark("digits-attributes", seed=2)
    for s in SPLITS:
        assert torch.equal(getattr(a, s).inputs[0], getattr(b, s).inputs[0])
        assert all(torch.equal(u, v) for u, v in zip(getattr(a, s).targets, getattr(b, s).targets, strict=True))
    assert not torch.equal(a.test.inputs[0], c.test.inputs[0])
    noisy = load_benchmark("digits-attributes", seed=1, label_noise=0.2)
    flipped = torch.stack([(u != v).float().mean() for u, v in zip(a.train.targets, noisy.train.targets, strict=True)])
    assert ((flipped > 0.15) & (flipped < 0.25)).all()
    assert all(torch.equal(u, v) for u, v in zip(a.test.targets, noisy.test.targets, strict=True))
    per_task = load_benchmark("digits-attributes", seed=1, label_noise=[0.0] * 7 + [0.3])
    assert torch.equal(per_task.train.targets[0], a.train.targets[0])
    assert not torch.equal(per_task.train.targets[7], a.train.targets[7])
    with pytest.raises(ValueError, match="label_noise"):
        load_benchmark("digits-attributes", label_noise=0.6)
    image = load_benchmark("digits-attributes", flatten=False)
    assert image.input_shape == (1, 8, 8) and image.train.inputs[0].shape == (1077, 1, 8, 8)


# ---------------------------------------------------------------------------------------------
# digits-dkl


def test_digits_dkl_layout():
    b = load_benchmark("digits-dkl")
    assert not b.homogeneous and b.input_shape == (64,)
    assert [(t.kind, t.num_outputs) for t in b.tasks] == [("multiclass", 10), ("multiclass", 10), ("multiclass", 5)]
    total = 0
    seen: set[bytes] = set()
    for s in SPLITS:
        split = getattr(b, s)
        assert split.inputs[0] is not split.inputs[1]
        for t, (x, y) in enumerate(zip(split.inputs, split.targets, strict=True)):
            assert x.dtype == torch.float32 and x.shape[1:] == (64,)
            assert y.dtype == torch.int64 and 0 <= y.min() and y.max() < b.tasks[t].num_outputs
            rows = _rows(x)
            assert not rows & seen  # tasks and splits are disjoint
            seen |= rows
            total += x.shape[0]
    assert total == 1797
    pooled = torch.cat(b.train.inputs)
    torch.testing.assert_close(pooled.mean(0), torch.zeros(64), atol=1e-5, rtol=0)
    # Every class of every task appears in its training set.
    assert [len(y.unique()) for y in b.train.targets] == [10, 10, 5]
    again = load_benchmark("digits-dkl")
    assert all(torch.equal(u, v) for u, v in zip(b.test.inputs, again.test.inputs, strict=True))
    assert load_benchmark("digits-dkl", flatten=False).test.inputs[2].shape[1:] == (1, 8, 8)


# ---------------------------------------------------------------------------------------------
# synthetic


def test_task_directions_follow_the_knob():
    for r in (0.0, 0.3, 1.0):
        w = task_directions(4, 10, r, seed=0)
        cos = w @ w.T
        np.testing.assert_allclose(np.diag(cos), 1.0, atol=1e-12)
        signs = np.where(np.arange(4) % 2 == 0, 1.0, -1.0)
        expected = r**2 + (1 - r**2) * np.outer(signs, signs) / 2
        np.fill_diagonal(expected, 1.0)
        np.testing.assert_allclose(cos, expected, atol=1e-12)


def test_synthetic_layout_and_relatedness():
    b = synthetic(n_tasks=3, n_samples=500, n_features=8, relatedness=1.0, noise=0.0, seed=4)
    assert b.homogeneous and b.input_shape == (8,)
    assert [getattr(b, s).sizes for s in SPLITS] == [[300] * 3, [100] * 3, [100] * 3]
    for s in SPLITS:
        split = getattr(b, s)
        assert all(x is split.inputs[0] for x in split.inputs)
    # relatedness 1, no noise: all tasks have the same target.
    assert torch.allclose(b.train.targets[0], b.train.targets[2], atol=1e-5)

    # The mean pairwise correlation of the targets rises with relatedness: negative (conflicting
    # pairs dominate) at 0, positive in between, ~1 at 1.
    def mean_corr(r: float) -> float:
        bench = synthetic(n_tasks=4, n_samples=2000, relatedness=r, noise=0.0, seed=4)
        c = np.corrcoef(torch.stack(bench.train.targets).numpy())
        return float(c[np.triu_indices(4, 1)].mean())

    corrs = [mean_corr(r) for r in (0.0, 0.5, 0.9, 1.0)]
    assert corrs[0] < 0 < corrs[1] < corrs[2] < 0.99 < corrs[3], corrs
    y = torch.cat(b.train.targets)
    assert abs(y.mean().item()) < 0.2 and 0.7 < y.std().item() < 1.3  # unit-variance signal


def test_synthetic_heterogeneous_binary_and_errors():
    b = synthetic(task_kind="binary", homogeneous=False, n_tasks=3, n_samples=200, seed=1)
    assert not b.homogeneous and b.train.inputs[0] is not b.train.inputs[1]
    assert all(t.kind == "binary" for t in b.tasks)
    for y in b.train.targets:
        assert y.dtype == torch.float32 and 0.35 < y.mean().item() < 0.65
    c = synthetic(task_kind="binary", homogeneous=False, n_tasks=3, n_samples=200, seed=1)
    assert torch.equal(b.val.inputs[2], c.val.inputs[2])
    with pytest.raises(ValueError, match="relatedness"):
        synthetic(relatedness=1.5)
    with pytest.raises(ValueError, match="n_features"):
        synthetic(n_tasks=6, n_features=7)
    with pytest.raises(ValueError, match="task_kind"):
        synthetic(task_kind="multiclass")


@pytest.mark.slow
def test_synthetic_knob_gives_negative_transfer_when_unrelated():
    """A dense shared-trunk MLP vs one MLP per task: MTL/STL test MSE ratio falls as relatedness rises."""
    from torch import nn

    def fit(b: Benchmark, tasks: list[int], seed: int) -> list[float]:
        torch.manual_seed(seed)
        trunk = nn.Sequential(nn.Linear(b.input_shape[0], 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU())
        heads = nn.ModuleList(nn.Linear(16, 1) for _ in tasks)
        opt = torch.optim.Adam([*trunk.parameters(), *heads.parameters()], lr=3e-3)
        n = b.train.sizes[0]
        for _ in range(60):
            for idx in torch.randperm(n).split(64):
                loss = sum(
                    ((heads[j](trunk(b.train.inputs[t][idx])).squeeze(-1) - b.train.targets[t][idx]) ** 2).mean()
                    for j, t in enumerate(tasks)
                )
                opt.zero_grad()
                loss.backward()
                opt.step()
        with torch.no_grad():
            return [
                ((heads[j](trunk(b.test.inputs[t])).squeeze(-1) - b.test.targets[t]) ** 2).mean().item()
                for j, t in enumerate(tasks)
            ]

    ratios = {}
    for r in (0.0, 1.0):
        per_seed = []
        for seed in (0, 1):
            b = synthetic(seed=seed, relatedness=r)
            stl = np.mean([fit(b, [t], seed)[0] for t in range(b.num_tasks)])
            mtl = np.mean(fit(b, list(range(b.num_tasks)), seed))
            per_seed.append(mtl / stl)
        ratios[r] = float(np.mean(per_seed))
    assert ratios[0.0] > 1.1 and ratios[0.0] > ratios[1.0] + 0.2, ratios


# ---------------------------------------------------------------------------------------------
# IDX files and DKL-mnist


def _idx_bytes(array: np.ndarray) -> bytes:
    codes = {np.dtype(np.uint8): 0x08, np.dtype(np.int32): 0x0C, np.dtype(np.float32): 0x0D}
    header = bytes([0, 0, codes[array.dtype], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def _write_idx(path: Path, array: np.ndarray, gz: bool = False) -> Path:
    data = _idx_bytes(array)
    if gz:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.float32])
def test_read_idx_roundtrip(tmp_path, gz, dtype):
    array = (np.arange(2 * 3 * 5) % 200).astype(dtype).reshape(2, 3, 5)
    path = _write_idx(tmp_path / "images-idx3-ubyte", array, gz)
    out = read_idx(path)
    assert out.shape == (2, 3, 5) and out.dtype == torch.from_numpy(array).dtype
    np.testing.assert_array_equal(out.numpy(), array)


def test_read_idx_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope-idx1-ubyte"):
        read_idx(tmp_path / "nope-idx1-ubyte")
    bad_magic = tmp_path / "bad"
    bad_magic.write_bytes(b"\x01\x02\x08\x01" + struct.pack(">I", 1) + b"\x00")
    with pytest.raises(ValueError, match=f"{bad_magic}.*magic"):
        read_idx(bad_magic)
    truncated = tmp_path / "short"
    truncated.write_bytes(_idx_bytes(np.zeros((4, 2), np.uint8))[:-1])
    with pytest.raises(ValueError, match=f"{truncated}.*declares shape"):
        read_idx(truncated)
    code = tmp_path / "code"
    code.write_bytes(b"\x00\x00\x07\x01" + struct.pack(">I", 1) + b"\x00")
    with pytest.raises(ValueError, match="type code 0x07"):
        read_idx(code)
    broken_gz = tmp_path / "broken.gz"
    broken_gz.write_bytes(gzip.compress(_idx_bytes(np.zeros(5, np.uint8)))[:-6])
    with pytest.raises(ValueError, match="broken.gz"):
        read_idx(broken_gz)


def _write_set(directory: Path, prefix: str, test_name: str, classes: int, offset: int, gz: bool, seed: int) -> None:
    rng = np.random.default_rng(seed)
    directory.mkdir()
    for split, per_class in (("train", 3), (test_name, 1)):
        labels = np.repeat(np.arange(classes), per_class).astype(np.uint8) + offset
        images = rng.integers(0, 256, size=(len(labels), 28, 28), dtype=np.uint8)
        _write_idx(directory / f"{prefix}{split}-images-idx3-ubyte", images, gz)
        _write_idx(directory / f"{prefix}{split}-labels-idx1-ubyte", labels, gz)


@pytest.fixture
def dkl_dirs(tmp_path):
    _write_set(tmp_path / "mnist", "", "t10k", 10, 0, False, 0)
    _write_set(tmp_path / "kmnist", "", "t10k", 10, 0, True, 1)
    _write_set(tmp_path / "emnist", "emnist-letters-", "test", 26, 1, True, 2)
    return tmp_path / "mnist", tmp_path / "kmnist", tmp_path / "emnist"


def test_dkl_mnist_loader(dkl_dirs):
    b = dkl_mnist(*dkl_dirs, seed=0, val_fraction=1 / 3)
    assert [t.name for t in b.tasks] == ["mnist", "kmnist", "emnist_letters"]
    assert [t.num_outputs for t in b.tasks] == [10, 10, 26]
    assert not b.homogeneous and b.input_shape == (1, 28, 28)
    assert b.train.sizes == [20, 20, 52] and b.val.sizes == [10, 10, 26] and b.test.sizes == [10, 10, 26]
    assert b.test.targets[2].tolist() == list(range(26))  # EMNIST 1..26 -> 0..25
    for y, t in zip(b.val.targets, b.tasks, strict=True):
        assert len(y.unique()) == t.num_outputs  # stratified validation split
    pooled = torch.cat([x.reshape(-1) for x in b.train.inputs])
    assert abs(pooled.mean().item()) < 1e-4 and abs(pooled.std().item() - 1) < 1e-3
    # EMNIST images are stored transposed; the loader transposes them back.
    raw = read_idx(dkl_dirs[2] / "emnist-letters-test-images-idx3-ubyte.gz").to(torch.float32)
    mnist_test = read_idx(dkl_dirs[0] / "t10k-images-idx3-ubyte").to(torch.float32)
    x = b.test.inputs[2][:, 0]
    a, c = x[0, 0, 1] - x[0, 0, 0], x[0, 1, 0] - x[0, 0, 0]  # standardized differences scale by 1 / (255 std)
    ratio = (raw[0, 1, 0] - raw[0, 0, 0]) / (raw[0, 0, 1] - raw[0, 0, 0])
    torch.testing.assert_close(a / c, ratio, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(
        b.test.inputs[0][:, 0].argsort(dim=-1), mnist_test.argsort(dim=-1)
    )  # MNIST is not transposed
    limited = dkl_mnist(*dkl_dirs, limit=15, val_fraction=0.2)
    assert limited.train.sizes == [12, 12, 12] and limited.test.sizes == [10, 10, 15]


def test_dkl_mnist_errors(dkl_dirs, tmp_path):
    mnist, kmnist, emnist = dkl_dirs
    (kmnist / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        dkl_mnist(mnist, kmnist, emnist)
    _write_idx(kmnist / "t10k-labels-idx1-ubyte", np.zeros(3, np.uint8))
    with pytest.raises(ValueError, match="3 labels but"):
        dkl_mnist(mnist, kmnist, emnist)
    _write_idx(kmnist / "t10k-labels-idx1-ubyte", np.full(10, 12, np.uint8))
    with pytest.raises(ValueError, match="labels must be in"):
        dkl_mnist(mnist, kmnist, emnist)
    with pytest.raises(FileNotFoundError, match="missing-dir"):
        dkl_mnist(mnist, tmp_path / "missing-dir", emnist)


# ---------------------------------------------------------------------------------------------
# CelebA


NAMES = ["5_o_Clock_Shadow", "Male", "Smiling", "Young", "Eyeglasses"]


def _write_celeba(root: Path, n: int = 12) -> tuple[Path, Path, np.ndarray]:
    from PIL import Image

    rng = np.random.default_rng(0)
    values = rng.choice([-1, 1], size=(n, len(NAMES)))
    image_dir = root / "img_align_celeba"
    image_dir.mkdir()
    lines = [str(n), " ".join(NAMES)]
    for i in range(n):
        name = f"{i + 1:06d}.png"
        pixels = rng.integers(0, 256, size=(22, 18, 3), dtype=np.uint8)  # portrait, like CelebA's 218x178
        Image.fromarray(pixels).save(image_dir / name)
        lines.append(name + " " + " ".join(f"{v:2d}" for v in values[i]))
    attr = root / "list_attr_celeba.txt"
    attr.write_text("\n".join(lines) + "\n")
    return attr, image_dir, values


def test_celeba_random_split(tmp_path):
    attr, image_dir, values = _write_celeba(tmp_path)
    b = celeba(attr, image_dir, ["Smiling", "Male"], image_size=8, val_fraction=0.25, test_fraction=0.25)
    assert b.homogeneous and b.input_shape == (3, 8, 8) and [t.name for t in b.tasks] == ["Smiling", "Male"]
    assert sum(getattr(b, s).sizes[0] for s in SPLITS) == 12 and b.test.sizes == [3, 3]
    rows = [_rows(getattr(b, s).inputs[0]) for s in SPLITS]
    assert len(rows[0] | rows[1] | rows[2]) == 12
    positives = int(sum(getattr(b, s).targets[0].sum().item() for s in SPLITS))
    assert positives == int((values[:, NAMES.index("Smiling")] == 1).sum())
    assert b.train.inputs[0] is b.train.inputs[1] and b.train.targets[0].dtype == torch.float32
    torch.testing.assert_close(b.train.inputs[0].mean((0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)


def test_celeba_through_the_registry_splits_attribute_text(tmp_path):
    attr, image_dir, _ = _write_celeba(tmp_path)
    direct = celeba(attr, image_dir, ["Smiling", "Male"], image_size=8)
    named = load_benchmark("celeba", attr_file=attr, image_dir=image_dir, attributes="Smiling,Male,", image_size=8)
    assert [t.name for t in named.tasks] == ["Smiling", "Male"]
    assert torch.equal(named.test.inputs[0], direct.test.inputs[0])
    assert all(torch.equal(a, b) for a, b in zip(named.test.targets, direct.test.targets))


def test_celeba_partition_and_limit(tmp_path):
    attr, image_dir, values = _write_celeba(tmp_path)
    partition = tmp_path / "list_eval_partition.txt"
    partition.write_text("".join(f"{i + 1:06d}.png {0 if i < 6 else 1 if i < 9 else 2}\n" for i in range(12)))
    b = celeba(attr, image_dir, ["Young"], image_size=4, partition_file=partition)
    assert b.train.sizes == [6] and b.val.sizes == [3] and b.test.sizes == [3]
    young = (values[:, NAMES.index("Young")] == 1).astype(np.float32)
    np.testing.assert_array_equal(b.test.targets[0].numpy(), young[9:])
    limited = celeba(attr, image_dir, ["Young", "Eyeglasses"], image_size=4, limit=6, val_fraction=0.2)
    assert sum(getattr(limited, s).sizes[0] for s in SPLITS) == 6


def test_celeba_errors(tmp_path):
    attr, image_dir, _ = _write_celeba(tmp_path)
    with pytest.raises(ValueError, match="unknown attribute.*Bald"):
        celeba(attr, image_dir, ["Bald"])
    with pytest.raises(FileNotFoundError, match="no_attr.txt"):
        celeba(tmp_path / "no_attr.txt", image_dir, ["Male"])
    lines = attr.read_text().splitlines()
    bad_count = tmp_path / "count.txt"
    bad_count.write_text("\n".join(["13", *lines[1:]]))
    with pytest.raises(ValueError, match="count.txt: header says 13"):
        celeba(bad_count, image_dir, ["Male"])
    bad_value = tmp_path / "value.txt"
    bad_value.write_text("\n".join([*lines[:2], lines[2].replace("-1", " 0", 1).replace(" 1", " 0", 1), *lines[3:]]))
    with pytest.raises(ValueError, match="value.txt line 3"):
        celeba(bad_value, image_dir, ["Male"])
    (image_dir / "000005.png").unlink()
    with pytest.raises(FileNotFoundError, match="000005.png"):
        celeba(attr, image_dir, ["Male"], image_size=4)
    (image_dir / "000005.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="000005.png"):
        celeba(attr, image_dir, ["Male"], image_size=4)
    partition = tmp_path / "part.txt"
    partition.write_text("000001.png 0\n")
    with pytest.raises(ValueError, match="part.txt: no partition"):
        celeba(attr, image_dir, ["Male"], partition_file=partition)


# ---------------------------------------------------------------------------------------------
# Cityscapes


def _write_cityscapes(root: Path, counts: dict[str, int], h: int = 4, w: int = 6) -> None:
    rng = np.random.default_rng(0)
    for split, n in counts.items():
        for sub in ("image", "label", "depth"):
            (root / split / sub).mkdir(parents=True)
        for i in range(n):
            np.save(root / split / "image" / f"{i}.npy", rng.random((h, w, 3)).astype(np.float32))
            label = rng.integers(-1, 7, size=(h, w)).astype(np.float32)
            np.save(root / split / "label" / f"{i}.npy", label)
            depth = rng.random((h, w, 1)).astype(np.float32)
            depth[0, 0, 0] = 0.0
            np.save(root / split / "depth" / f"{i}.npy", depth)


def test_cityscapes_loader(tmp_path):
    _write_cityscapes(tmp_path, {"train": 10, "val": 3})
    b = cityscapes(tmp_path, val_fraction=0.2)
    assert [(t.name, t.kind, t.num_outputs) for t in b.tasks] == [
        ("segmentation", "segmentation", 7),
        ("depth", "depth", 1),
    ]
    assert b.homogeneous and b.input_shape == (3, 4, 6)
    assert b.train.sizes == [8, 8] and b.val.sizes == [2, 2] and b.test.sizes == [3, 3]
    seg, depth = b.test.targets
    assert seg.dtype == torch.int64 and seg.shape == (3, 4, 6) and seg.min() >= -1 and seg.max() <= 6
    assert depth.dtype == torch.float32 and depth.shape == (3, 1, 4, 6) and depth[0, 0, 0, 0] == 0
    np.testing.assert_array_equal(seg[2].numpy(), np.load(tmp_path / "val" / "label" / "2.npy").astype(np.int64))
    np.testing.assert_array_equal(depth[1, 0].numpy(), np.load(tmp_path / "val" / "depth" / "1.npy")[..., 0])
    torch.testing.assert_close(b.train.inputs[0].mean((0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    assert cityscapes(tmp_path, limit=5, val_fraction=0.2).train.sizes == [4, 4]


def test_cityscapes_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        cityscapes(tmp_path / "nowhere")
    _write_cityscapes(tmp_path, {"train": 4, "val": 2})
    with pytest.raises(FileNotFoundError, match="train/train/image"):
        cityscapes(tmp_path / "train")
    np.save(tmp_path / "train" / "label" / "1.npy", np.full((4, 6), 9.0, np.float32))
    with pytest.raises(ValueError, match=r"label.1\.npy.*labels must be integers"):
        cityscapes(tmp_path)
    (tmp_path / "train" / "label" / "1.npy").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"label.1\.npy"):
        cityscapes(tmp_path)
    (tmp_path / "train" / "label" / "1.npy").unlink()
    with pytest.raises(ValueError, match="holds indices"):
        cityscapes(tmp_path)
