"""Every benchmark by name, built in or read from local files: :data:`BENCHMARKS` and
:func:`load_benchmark`. Adding one: its builder module, and one entry below."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .benchmark import Benchmark
from .celeba import celeba
from .celeba_groups import celeba_groups
from .cityscapes import cityscapes
from .digits import digits_attributes, digits_dkl
from .idx import dkl_mnist
from .qm9 import QM9_CPU_SETTINGS, qm9
from .shapes import shapes
from .synthetic import synthetic


def _comma_list(text: str) -> list[str]:
    return [a for a in text.split(",") if a]


@dataclass(frozen=True)
class BenchmarkEntry:
    """One benchmark: its builder (``builder(..., seed=...)``), a one-line description, whether it
    reads the user's local files, converters for options given as text (``-o KEY=VALUE``), and the
    run settings (``ExperimentConfig`` fields) ``fsmtl run`` uses for it unless given."""

    builder: Callable[..., Benchmark]
    description: str
    local_files: bool = False
    from_text: Mapping[str, Callable[[str], Any]] = field(default_factory=dict)
    run_defaults: Mapping[str, Any] = field(default_factory=dict)

    @property
    def options(self) -> list[str]:
        """Every option the builder takes (``seed`` aside), in signature order."""
        return [name for name in inspect.signature(self.builder).parameters if name != "seed"]

    @property
    def required(self) -> list[str]:
        """The options without a default (the data paths of a local-files benchmark)."""
        return [p.name for p in inspect.signature(self.builder).parameters.values() if p.default is p.empty]

    @property
    def summary(self) -> str:
        return f"local files, {self.description}" if self.local_files else self.description


BENCHMARKS: dict[str, BenchmarkEntry] = {
    "digits-attributes": BenchmarkEntry(
        digits_attributes,
        "homogeneous, 8 binary attribute tasks (is_even, is_prime, has_loop, ...) over one 8x8 digit image, "
        "CelebA-like; options: label_noise, flatten",
    ),
    "digits-dkl": BenchmarkEntry(
        digits_dkl,
        "heterogeneous, 3 multiclass tasks on disjoint digit subsets (original / mirrored + permuted labels / "
        "inverted + noisy, mod 5), DKL-mnist-like; options: noise, flatten",
    ),
    "synthetic": BenchmarkEntry(
        synthetic,
        "synthetic regression or binary tasks with a relatedness knob in [0, 1] (low = negative transfer); "
        "options: n_tasks, n_samples, n_features, relatedness, noise, task_kind, homogeneous",
    ),
    "shapes": BenchmarkEntry(
        shapes,
        "homogeneous, 10 binary attribute tasks over procedural 32x32 (or 64x64) RGB scenes of one to three shapes "
        "(has_circle, has_warm, many, big, striped, ...); options: n_train, n_val, n_test, image_size, relatedness",
        # Sized so that the 13-method comparison over 3 seeds stays within 30 minutes on 2 CPU cores.
        run_defaults={
            "benchmark_options": {"n_train": 1500},
            "epochs": 3,
            "hidden": 16,
            "keep_ratios": (0.5, 0.9),
            "warmup": 1,
            "update_every": 1,
        },
    ),
    "qm9": BenchmarkEntry(
        qm9,
        "homogeneous, QM9's 11 regression targets (mu, alpha, homo, lumo, r2, zpve, U0, U, H, G, cv) per molecule, "
        "read from the qm9pack package (pip install -e '.[qm9]'), Nash-MTL's MPNN; options: n_train, n_val, n_test, "
        "source (a folder of CSV files in qm9pack's layout), cache_dir, targets (comma-separated subset)",
        # Sized for 2 CPU cores: `fsmtl run --benchmark qm9 --methods stl,mtl,rs,fs` within 30 minutes.
        run_defaults=QM9_CPU_SETTINGS,
    ),
    "dkl-mnist": BenchmarkEntry(
        dkl_mnist,
        "options mnist_dir, kmnist_dir, emnist_letters_dir (IDX files); optional limit",
        local_files=True,
    ),
    "celeba": BenchmarkEntry(
        celeba,
        "options attr_file, image_dir, attributes (comma-separated names); optional image_size, limit, partition_file",
        local_files=True,
        from_text={"attributes": _comma_list},
    ),
    "celeba-groups": BenchmarkEntry(
        celeba_groups,
        "options attr_file, image_dir; all 40 attributes as 8 multi-label tasks of 5 (fsmtl.data.celeba_groups); "
        "optional image_size, limit, partition_file",
        local_files=True,
    ),
    "cityscapes": BenchmarkEntry(cityscapes, "option root (MTAN/LibMTL .npy layout); optional limit", local_files=True),
}


def load_benchmark(name: str, *, seed: int = 0, **options: Any) -> Benchmark:
    """Build benchmark ``name`` (a key of :data:`BENCHMARKS`), deterministically given ``seed``.

    ``options`` go to the builder (e.g. :func:`~fsmtl.data.synthetic.synthetic`'s ``relatedness``,
    or :func:`~fsmtl.data.celeba.celeba`'s paths); a string value of an option the entry converts
    from text (CelebA's comma-separated ``attributes``) is converted first. An unknown benchmark or
    option, or a missing required one, raises ValueError naming the valid choices.
    """
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; choose one of {sorted(BENCHMARKS)}")
    entry = BENCHMARKS[name]
    valid = entry.options
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for benchmark {name!r}; valid options: {valid}")
    missing = [r for r in entry.required if r not in options]
    if missing:
        raise ValueError(f"benchmark {name!r} needs {entry.description}; missing {missing}")
    options = {
        k: entry.from_text[k](v) if k in entry.from_text and isinstance(v, str) else v for k, v in options.items()
    }
    return entry.builder(seed=seed, **options)
