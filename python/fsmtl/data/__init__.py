"""Multi-task benchmarks: embedded ones that need no download, and loaders for the paper's data sets.

Embedded (see :data:`BENCHMARKS`, built by :func:`load_benchmark`): ``digits-attributes``,
``digits-dkl`` and ``synthetic``. Loaders of local files: :func:`read_idx` and :func:`dkl_mnist`
(MNIST / KMNIST / EMNIST-letters IDX files), :func:`celeba` (attribute file plus images) and
:func:`cityscapes` (MTAN/LibMTL preprocessed ``.npy`` arrays).
"""

from ._types import TASK_KINDS, Benchmark, Split, Task
from .celeba import celeba, read_attributes, read_partition
from .cityscapes import cityscapes
from .digits import ATTRIBUTES, POSITIVE_RATES, digits_attributes, digits_dkl
from .idx import dkl_mnist, read_idx
from .registry import BENCHMARKS, load_benchmark
from .synthetic import synthetic

__all__ = [
    "ATTRIBUTES",
    "BENCHMARKS",
    "POSITIVE_RATES",
    "TASK_KINDS",
    "Benchmark",
    "Split",
    "Task",
    "celeba",
    "cityscapes",
    "digits_attributes",
    "digits_dkl",
    "dkl_mnist",
    "load_benchmark",
    "read_attributes",
    "read_idx",
    "read_partition",
    "synthetic",
]
