"""The procedural ``shapes`` benchmark: registered, deterministic, labels follow the pixels, and
the relatedness knob couples the attributes."""

import numpy as np
import pytest
import torch

from fsmtl.data import BENCHMARKS, SHAPES_TASKS, load_benchmark, render_scenes


def test_registered_and_deterministic():
    assert "shapes" in BENCHMARKS and BENCHMARKS["shapes"].options == [
        "n_train",
        "n_val",
        "n_test",
        "image_size",
        "relatedness",
    ]
    a = load_benchmark("shapes", n_train=64, n_val=16, n_test=16)
    b = load_benchmark("shapes", n_train=64, n_val=16, n_test=16)
    c = load_benchmark("shapes", seed=1, n_train=64, n_val=16, n_test=16)
    assert [t.name for t in a.tasks] == list(SHAPES_TASKS) and a.homogeneous
    assert a.input_shape == (3, 32, 32) and a.train.inputs[0].shape == (64, 3, 32, 32)
    torch.testing.assert_close(a.train.inputs[0], b.train.inputs[0], rtol=0, atol=0)
    assert all(torch.equal(x, y) for x, y in zip(a.test.targets, b.test.targets))
    assert not torch.equal(a.train.inputs[0], c.train.inputs[0])
    # standardised with train statistics
    torch.testing.assert_close(a.train.inputs[0].mean((0, 2, 3)), torch.zeros(3), atol=1e-4, rtol=0)
    assert load_benchmark("shapes", n_train=8, n_val=4, n_test=4, image_size=64).input_shape == (3, 64, 64)


def test_labels_follow_the_factors_and_pixels():
    images, labels, f = render_scenes(400, seed=3)
    assert images.dtype == np.uint8 and images.shape == (400, 3, 32, 32) and labels.shape == (400, 10)
    col = {n: labels[:, i].astype(bool) for i, n in enumerate(SHAPES_TASKS)}
    np.testing.assert_array_equal(col["many"], f["count"] == 3)
    np.testing.assert_array_equal(col["warm_circle"] & ~col["has_circle"], np.zeros(400, bool))
    # The corner pixel (rarely covered by a shape) tells the background.
    corner = images[:, :, 0, 0].astype(float).mean(1)
    assert ((corner > 120) == col["light_bg"]).mean() > 0.95
    # A scene with no warm shape has no pixel with a red-dominant colour of the palette.
    red = (images[:, 0] > 200) & (images[:, 2] < 80)
    assert not red[~col["has_warm"] & ~col["light_bg"]].any()


def test_relatedness_couples_the_attributes():
    def corr(r, a="has_circle", b="striped"):
        _, labels, _ = render_scenes(3000, relatedness=r, seed=0)
        return np.corrcoef(labels[:, SHAPES_TASKS.index(a)], labels[:, SHAPES_TASKS.index(b)])[0, 1]

    # At 0 the two share only the shape count; the latent mode couples them as r grows.
    assert corr(0.0) < 0.15 < corr(0.5) < corr(0.9) and corr(0.9) > 0.5
    assert max(abs(corr(r, "has_circle", "light_bg")) for r in (0.0, 0.9)) < 0.06


@pytest.mark.parametrize(
    "options, error",
    [({"image_size": 48}, ValueError), ({"relatedness": 1.5}, ValueError), ({"n_train": 0}, ValueError)],
)
def test_bad_options(options, error):
    with pytest.raises(error):
        load_benchmark("shapes", **options)


def test_the_peers_run_on_shapes_from_the_command(tmp_path, capsys):
    from fsmtl.run.cli import main

    out = tmp_path / "out"
    args = ["run", "--benchmark", "shapes", "-o", "n_train=48", "-o", "n_val=32", "-o", "n_test=32", "--seeds", "0"]
    args += [
        "--methods",
        "mtl,gradnorm,mgda-ub,rlw,se,tr,mr",
        "--keep-ratios",
        "0.5",
        "--no-progress",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    table = capsys.readouterr().out
    for label in ("MTL", "GradNorm", "MGDA-UB", "RLW", "SE", "TR ", "MR "):
        assert label in table
    config = __import__("json").loads((out / "results.json").read_text())["config"]
    assert (config["epochs"], config["hidden"], config["keep_ratios"]) == (3, 16, [0.5])  # shapes' run defaults


def test_missing_solvers_are_refused_before_training(capsys):
    from fsmtl.run.cli import main
    from fsmtl.strategies import METHODS

    missing = METHODS["cagrad"].missing_packages()
    if not missing:
        pytest.skip("cvxpy and clarabel are installed here")
    assert main(["run", "--benchmark", "shapes", "--methods", "mtl,cagrad", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "method 'cagrad' needs" in err and ".[peers]" in err and missing[0] in err
