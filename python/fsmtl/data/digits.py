"""Embedded benchmarks built from scikit-learn's bundled handwritten digits (1797 images, 8x8, 0..16).

* :func:`digits_attributes`: homogeneous, 8 binary attribute tasks over one image, like CelebA's
  multi-label attributes.
* :func:`digits_dkl`: heterogeneous, 3 multiclass tasks on disjoint subsets of the digits, each with
  its own image transform and label map, in the spirit of DKL-mnist (MNIST / KMNIST / EMNIST).

Both ship with scikit-learn (``sklearn.datasets.load_digits`` reads a file inside the package), so
they need no download and are deterministic given ``seed``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from sklearn.datasets import load_digits

from ..tasks import Task
from ._split import check_fraction, standardize, three_way_split
from .benchmark import Benchmark
from .split import Split

# The 8 attributes of ``digits-attributes``. Class attributes depend on the digit only; image
# attributes on the pixels (like CelebA's "Smiling" vs "Male"). Pairs are chosen to correlate
# (is_large ~ has_loop: 6, 8, 9) and to conflict (is_even vs is_prime share only 2; has_loop and
# has_straight_stroke are disjoint), so a dense shared trunk sees both helpful and harmful transfer.
ATTRIBUTES: dict[str, str] = {
    "is_even": "digit in {0, 2, 4, 6, 8}",
    "is_prime": "digit in {2, 3, 5, 7}",
    "is_large": "digit >= 5",
    "has_loop": "digit has a closed loop: {0, 6, 8, 9}",
    "has_straight_stroke": "digit is drawn with straight strokes: {1, 4, 7}",
    "is_symmetric": "image is nearly left-right symmetric: sum|x - mirror(x)| / sum(x) below its 35% quantile",
    "heavy_ink": "total ink (sum of the 64 pixels) above its median",
    "top_heavy": "more ink in the upper 4 rows than in the lower 4 rows",
}

# Train positive rates measured with seed 0 (label_noise 0); tests check them within +-0.03.
POSITIVE_RATES: dict[str, float] = {
    "is_even": 0.497,
    "is_prime": 0.401,
    "is_large": 0.499,
    "has_loop": 0.396,
    "has_straight_stroke": 0.302,
    "is_symmetric": 0.367,
    "heavy_ink": 0.495,
    "top_heavy": 0.551,
}


def _attribute_matrix(images: np.ndarray, digits: np.ndarray) -> np.ndarray:
    """``[n, 8]`` float32 {0, 1} matrix of the :data:`ATTRIBUTES`, from images ``[n, 8, 8]`` and labels ``[n]``."""
    ink = images.sum(axis=(1, 2))
    asymmetry = np.abs(images - images[:, :, ::-1]).sum(axis=(1, 2)) / ink
    columns = [
        np.isin(digits, [0, 2, 4, 6, 8]),
        np.isin(digits, [2, 3, 5, 7]),
        digits >= 5,
        np.isin(digits, [0, 6, 8, 9]),
        np.isin(digits, [1, 4, 7]),
        # Thresholds are quantiles over the whole bundled set: they define the label, not a feature
        # statistic, and do not depend on the seed.
        asymmetry < np.quantile(asymmetry, 0.35),
        ink > np.median(ink),
        images[:, :4].sum(axis=(1, 2)) > images[:, 4:].sum(axis=(1, 2)),
    ]
    return np.stack(columns, axis=1).astype(np.float32)


def _noise_rates(label_noise: float | Sequence[float], n_tasks: int) -> np.ndarray:
    if isinstance(label_noise, (int, float)) and not isinstance(label_noise, bool):
        rates = [float(label_noise)] * n_tasks
    elif isinstance(label_noise, Sequence) and not isinstance(label_noise, str):
        rates = [float(r) for r in label_noise]
        if len(rates) != n_tasks:
            raise ValueError(f"label_noise must be a float or {n_tasks} floats, got {len(rates)} values")
    else:
        raise TypeError(f"label_noise must be a float or a sequence of floats, got {type(label_noise).__name__}")
    for r in rates:
        if not 0.0 <= r < 0.5:
            raise ValueError(f"label_noise rates must be in [0, 0.5), got {r}")
    return np.asarray(rates)


def digits_attributes(
    *,
    seed: int = 0,
    label_noise: float | Sequence[float] = 0.0,
    flatten: bool = True,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
) -> Benchmark:
    """Homogeneous multi-label benchmark: 8 binary attribute tasks over one 8x8 digit image.

    The tasks are :data:`ATTRIBUTES` (in that order); their train positive rates with seed 0 are
    :data:`POSITIVE_RATES` (0.30 to 0.55, none degenerate). The split is 60/20/20, stratified by
    digit class; the features are standardized per pixel with train statistics.

    Args:
        seed: split seed and label-noise seed.
        label_noise: probability of flipping each *train* label (a float for all tasks or one per
            task, in [0, 0.5)); val and test labels stay clean so model selection and the reported
            numbers measure the true attributes.
        flatten: inputs ``[n, 64]`` (True) or images ``[n, 1, 8, 8]`` (False).
        val_fraction, test_fraction: split shares.

    Returns:
        Benchmark with ``inputs`` float32 ``[n, 64]`` (or ``[n, 1, 8, 8]``), the same tensor for all
        8 tasks, and targets float32 ``[n]`` in {0, 1}.
    """
    val_fraction = check_fraction(val_fraction, "val_fraction")
    test_fraction = check_fraction(test_fraction, "test_fraction")
    if val_fraction + test_fraction >= 1:
        raise ValueError(f"val_fraction + test_fraction must be < 1, got {val_fraction + test_fraction}")
    names = list(ATTRIBUTES)
    rates = _noise_rates(label_noise, len(names))
    digits = load_digits()
    images = digits.images.astype(np.float64)
    labels = digits.target.astype(np.int64)
    attributes = _attribute_matrix(images, labels)
    train_idx, val_idx, test_idx = three_way_split(
        len(labels), val_fraction=val_fraction, test_fraction=test_fraction, seed=seed, stratify=labels
    )
    train_attr = attributes[train_idx].copy()
    if rates.any():
        rng = np.random.default_rng(seed + 1000)
        flips = rng.random(train_attr.shape) < rates[None, :]
        train_attr[flips] = 1.0 - train_attr[flips]
    x = torch.from_numpy(images.reshape(len(labels), 64))
    xs = standardize(x[train_idx], x[val_idx], x[test_idx], dims=(0,))
    shape: tuple[int, ...] = (64,) if flatten else (1, 8, 8)
    xs = [v.reshape(-1, *shape) for v in xs]

    def split(x_split: torch.Tensor, attr: np.ndarray) -> Split:
        targets = [torch.from_numpy(np.ascontiguousarray(attr[:, t])) for t in range(len(names))]
        return Split(inputs=[x_split] * len(names), targets=targets)

    return Benchmark(
        name="digits-attributes",
        tasks=[Task(name, "binary", 1) for name in names],
        homogeneous=True,
        input_shape=shape,
        train=split(xs[0], train_attr),
        val=split(xs[1], attributes[val_idx]),
        test=split(xs[2], attributes[test_idx]),
    )


# Label maps of ``digits-dkl``: task 2 relabels the digits by a fixed permutation, task 3 by digit mod 5.
DKL_PERMUTATION = np.array([3, 8, 1, 9, 0, 6, 2, 7, 5, 4], dtype=np.int64)


def digits_dkl(
    *,
    seed: int = 0,
    noise: float = 2.0,
    flatten: bool = True,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
) -> Benchmark:
    """Heterogeneous 3-task benchmark in the spirit of DKL-mnist, from the bundled digits.

    The 1797 images are divided (stratified by digit, seeded) into 3 disjoint subsets of ~599, one
    per task, so every task has its own inputs, as MNIST / KMNIST / EMNIST-letters do:

    * ``digits``: the original images; label = the digit (10 classes).
    * ``mirrored_permuted``: images mirrored left-right; label = ``DKL_PERMUTATION[digit]`` (10
      classes), a label map that disagrees with task 1's, so a shared trunk sees conflicting targets.
    * ``inverted_noisy_mod5``: intensities inverted (16 - x) plus Gaussian pixel noise of std
      ``noise`` (pixel units, 0..16 scale); label = digit mod 5 (5 classes).

    Each task's subset is then split 60/20/20 stratified by its label. All tasks are standardized
    per pixel with statistics pooled over the three tasks' *train* inputs (one preprocessing for the
    shared trunk, as a real DKL-mnist pipeline would do).

    Returns:
        Benchmark with per-task inputs float32 ``[n_t, 64]`` (or ``[n_t, 1, 8, 8]``) and multiclass
        targets int64 ``[n_t]``.
    """
    val_fraction = check_fraction(val_fraction, "val_fraction")
    test_fraction = check_fraction(test_fraction, "test_fraction")
    if val_fraction + test_fraction >= 1:
        raise ValueError(f"val_fraction + test_fraction must be < 1, got {val_fraction + test_fraction}")
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or noise < 0:
        raise ValueError(f"noise must be a non-negative float, got {noise!r}")
    digits = load_digits()
    images = digits.images.astype(np.float64)
    labels = digits.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    # Deal each class's shuffled samples round-robin to the three tasks: disjoint, stratified subsets.
    owner = np.empty(len(labels), dtype=np.int64)
    for c in range(10):
        members = rng.permutation(np.flatnonzero(labels == c))
        owner[members] = (np.arange(len(members)) + c) % 3
    tasks = [
        Task("digits", "multiclass", 10),
        Task("mirrored_permuted", "multiclass", 10),
        Task("inverted_noisy_mod5", "multiclass", 5),
    ]
    per_split: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {
        name: ([], []) for name in ("train", "val", "test")
    }
    for t in range(3):
        idx = np.flatnonzero(owner == t)
        x, digit = images[idx], labels[idx]
        if t == 0:
            y = digit
        elif t == 1:
            x, y = x[:, :, ::-1], DKL_PERMUTATION[digit]
        else:
            x = 16.0 - x + rng.normal(0.0, noise, size=x.shape)
            y = digit % 5
        parts = three_way_split(
            len(idx), val_fraction=val_fraction, test_fraction=test_fraction, seed=seed + 10 * t, stratify=y
        )
        x_t = torch.from_numpy(np.ascontiguousarray(x).reshape(len(idx), 64))
        y_t = torch.from_numpy(np.ascontiguousarray(y))
        for name, part in zip(("train", "val", "test"), parts, strict=True):
            per_split[name][0].append(x_t[part])
            per_split[name][1].append(y_t[part])
    sizes = {name: [x.shape[0] for x in per_split[name][0]] for name in per_split}
    pooled = [torch.cat(per_split[name][0]) for name in ("train", "val", "test")]
    pooled = standardize(*pooled, dims=(0,))
    shape: tuple[int, ...] = (64,) if flatten else (1, 8, 8)
    splits = {}
    for name, x_all in zip(("train", "val", "test"), pooled, strict=True):
        inputs = [chunk.reshape(-1, *shape).contiguous() for chunk in torch.split(x_all, sizes[name])]
        splits[name] = Split(inputs=inputs, targets=per_split[name][1])
    return Benchmark(
        name="digits-dkl",
        tasks=tasks,
        homogeneous=False,
        input_shape=shape,
        train=splits["train"],
        val=splits["val"],
        test=splits["test"],
    )
