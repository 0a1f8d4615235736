"""Multi-task benchmarks: embedded ones that need no download, and loaders for the paper's data sets.

Every benchmark is an entry of :data:`BENCHMARKS`, built by :func:`load_benchmark`: embedded ones
(``digits-attributes``, ``digits-dkl``, ``synthetic``, ``shapes``) and the paper's data from local files
(``dkl-mnist``: :func:`dkl_mnist` over :func:`read_idx` files; ``celeba``: :func:`celeba`, an
attribute file plus images; ``cityscapes``: :func:`cityscapes`, MTAN/LibMTL ``.npy`` arrays).
"""

from .benchmark import Benchmark
from .celeba import CelebADataset, celeba, celeba_datasets, read_attributes, read_partition
from .cityscapes import CityscapesDataset, cityscapes, cityscapes_datasets
from .datasets import SplitDataset, backing_split, split_datasets
from .digits import ATTRIBUTES, POSITIVE_RATES, digits_attributes, digits_dkl
from .idx import dkl_mnist, read_idx
from .registry import BENCHMARKS, BenchmarkEntry, load_benchmark
from .shapes import TASK_NAMES as SHAPES_TASKS
from .shapes import render_scenes, shapes
from .split import Split
from .synthetic import synthetic

__all__ = [
    "ATTRIBUTES",
    "BENCHMARKS",
    "POSITIVE_RATES",
    "SHAPES_TASKS",
    "Benchmark",
    "BenchmarkEntry",
    "CelebADataset",
    "CityscapesDataset",
    "Split",
    "SplitDataset",
    "backing_split",
    "celeba",
    "celeba_datasets",
    "cityscapes",
    "cityscapes_datasets",
    "digits_attributes",
    "digits_dkl",
    "dkl_mnist",
    "load_benchmark",
    "read_attributes",
    "read_idx",
    "read_partition",
    "split_datasets",
    "render_scenes",
    "shapes",
    "synthetic",
]
