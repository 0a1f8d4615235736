"""Registry of the embedded benchmarks: :data:`BENCHMARKS` and :func:`load_benchmark`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ._types import Benchmark
from .digits import digits_attributes, digits_dkl
from .synthetic import synthetic

_BUILDERS: dict[str, Callable[..., Benchmark]] = {
    "digits-attributes": digits_attributes,
    "digits-dkl": digits_dkl,
    "synthetic": synthetic,
}

BENCHMARKS: dict[str, str] = {
    "digits-attributes": "homogeneous, 8 binary attribute tasks (is_even, is_prime, has_loop, ...) over one 8x8 digit "
    "image, CelebA-like; options: label_noise, flatten",
    "digits-dkl": "heterogeneous, 3 multiclass tasks on disjoint digit subsets (original / mirrored + permuted labels "
    "/ inverted + noisy, mod 5), DKL-mnist-like; options: noise, flatten",
    "synthetic": "synthetic regression or binary tasks with a relatedness knob in [0, 1] (low = negative transfer); "
    "options: n_tasks, n_samples, n_features, relatedness, noise, task_kind, homogeneous",
}


def load_benchmark(name: str, *, seed: int = 0, **options: Any) -> Benchmark:
    """Build the embedded benchmark ``name`` (a key of :data:`BENCHMARKS`), deterministically given ``seed``.

    ``options`` are passed to the builder (:func:`~fsmtl.data.digits.digits_attributes`,
    :func:`~fsmtl.data.digits.digits_dkl` or :func:`~fsmtl.data.synthetic.synthetic`); an unknown
    benchmark or option raises ValueError naming it and the valid choices.
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown benchmark {name!r}; choose one of {sorted(_BUILDERS)}")
    builder = _BUILDERS[name]
    valid = [p for p in builder.__kwdefaults__ if p != "seed"]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for benchmark {name!r}; valid options: {valid}")
    return builder(seed=seed, **options)
