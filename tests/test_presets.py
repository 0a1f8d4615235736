"""Presets and per-benchmark run defaults: ``fsmtl run --preset NAME`` on tiny files the tests write."""

import json

import numpy as np
import pytest
from test_data import _write_cityscapes, _write_set

from fsmtl.data import BENCHMARKS, load_benchmark
from fsmtl.data.celeba_groups import GROUPS
from fsmtl.run.cli import main
from fsmtl.run.experiment import ExperimentConfig, run_experiment
from fsmtl.run.presets import PRESETS, resolve_settings

ATTRIBUTES = [a for attrs in GROUPS.values() for a in attrs]


def test_groups_cover_the_40_celeba_attributes_once():
    assert len(GROUPS) == 8 and all(len(a) == 5 for a in GROUPS.values())
    assert len(set(ATTRIBUTES)) == 40


def test_resolve_settings_order_given_then_preset_then_benchmark_defaults():
    base = {"benchmark": "shapes", "benchmark_options": {}, "epochs": 40, "hidden": 128, "lr": 1e-3}
    shapes = resolve_settings(base, {"benchmark"}, None)
    assert (shapes["epochs"], shapes["hidden"], shapes["benchmark_options"]) == (3, 16, {"n_train": 1500})
    given = resolve_settings({**base, "benchmark_options": {"n_train": 99, "n_val": 7}}, {"benchmark", "option"}, None)
    assert given["benchmark_options"] == {"n_train": 99, "n_val": 7}
    assert resolve_settings(base, {"benchmark", "epochs"}, None)["epochs"] == 40  # given on the command line
    base = {**base, "benchmark": "digits-attributes"}
    assert resolve_settings(base, set(), None) == base  # no run defaults
    celeba = resolve_settings({**base, "benchmark_options": {"attr_file": "a"}}, {"option"}, "celeba-paper")
    assert celeba["benchmark"] == "celeba-groups" and celeba["model"] == "resnet18"
    assert (celeba["batch_size"], celeba["lr"], celeba["epochs"]) == (256, 1e-4, 40)
    assert celeba["benchmark_options"] == {"image_size": 64, "attr_file": "a"}
    with pytest.raises(ValueError, match="runs benchmark 'cityscapes', not 'shapes'"):
        resolve_settings(base | {"benchmark": "shapes"}, {"benchmark"}, "cityscapes-paper")
    assert all(p.sources and p.benchmark in BENCHMARKS for p in PRESETS.values())


def write_celeba40(root, n=10):
    from PIL import Image

    rng = np.random.default_rng(0)
    values = rng.choice([-1, 1], size=(n, 40))
    values[:, 0], values[:, 1] = 1, -1  # both classes present where it matters little
    image_dir = root / "img_align_celeba"
    image_dir.mkdir()
    lines = [str(n), " ".join(ATTRIBUTES)]
    for i in range(n):
        name = f"{i + 1:06d}.png"
        Image.fromarray(rng.integers(0, 256, size=(22, 18, 3), dtype=np.uint8)).save(image_dir / name)
        lines.append(name + " " + " ".join(f"{v:2d}" for v in values[i]))
    (root / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    return root / "list_attr_celeba.txt", image_dir, values


def run(tmp_path, *args):
    out = tmp_path / "out"
    code = main(["run", *args, "--seeds", "0", "--methods", "mtl", "--no-progress", "--out", str(out)])
    assert code == 0
    return json.loads((out / "results.json").read_text())


def test_celeba_paper_preset(tmp_path):
    attr, image_dir, values = write_celeba40(tmp_path)
    b = load_benchmark("celeba-groups", attr_file=attr, image_dir=image_dir, image_size=8)
    assert [(t.name, t.kind, t.num_outputs) for t in b.tasks] == [(g, "multilabel", 5) for g in GROUPS]
    assert b.train.targets[0].shape == (b.train.sizes[0], 5)
    args = ("--preset", "celeba-paper", "-o", f"attr_file={attr}", "-o", f"image_dir={image_dir}", "--epochs", "1")
    results = run(tmp_path, *args)
    cfg = results["config"]
    assert (cfg["benchmark"], cfg["model"], cfg["batch_size"], cfg["lr"], cfg["epochs"]) == (
        "celeba-groups",
        "resnet18",
        256,
        1e-4,
        1,
    )
    assert cfg["benchmark_options"]["image_size"] == 64
    assert [t["kind"] for t in results["benchmark"]["tasks"]] == ["multilabel"] * 8


def test_cityscapes_paper_preset(tmp_path):
    # Through the experiment, not the command: report.py cannot tabulate segmentation + depth
    # (no metric common to both tasks), a limitation of the report, not of the preset.
    _write_cityscapes(tmp_path / "cs", {"train": 6, "val": 2}, h=32, w=64)
    given = {"option", "epochs", "seeds", "methods"}
    base = {"benchmark": "digits-attributes", "benchmark_options": {"root": tmp_path / "cs"}, "epochs": 1}
    settings = resolve_settings(base | {"seeds": [0], "methods": ["mtl"]}, given, "cityscapes-paper")
    cfg = ExperimentConfig(**settings)
    assert (cfg.benchmark, cfg.model, cfg.batch_size, cfg.lr, cfg.epochs) == ("cityscapes", "segnet", 8, 1e-4, 1)
    results = run_experiment(cfg)
    assert set(results["methods"]["mtl"]["test_per_task"][0]) == {"miou", "pix_acc"}


def test_dkl_mnist_paper_preset(tmp_path):
    _write_set(tmp_path / "mnist", "", "t10k", 10, 0, False, 0)
    _write_set(tmp_path / "kmnist", "", "t10k", 10, 0, True, 1)
    _write_set(tmp_path / "emnist", "emnist-letters-", "test", 26, 1, True, 2)
    dirs = [
        f"{k}={tmp_path / d}"
        for k, d in (("mnist_dir", "mnist"), ("kmnist_dir", "kmnist"), ("emnist_letters_dir", "emnist"))
    ]
    results = run(tmp_path, "--preset", "dkl-mnist-paper", *[x for d in dirs for x in ("-o", d)], "--epochs", "1")
    cfg = results["config"]
    assert (cfg["benchmark"], cfg["model"], cfg["batch_size"]) == ("dkl-mnist", "cnn", 64)
    assert not results["benchmark"]["homogeneous"]
