"""FS / EFS: masks from the top-K Fisher information of each task (paper Eq. 9-11, Algorithm 2)."""

from __future__ import annotations

from functools import partial

import fsmtl_kernels as fk

from ...estimators import ESTIMATORS
from ..method import Method
from .base import SparseStrategy


class FisherSparse(SparseStrategy):
    """Fisher sparse multi-task learning.

    At every mask update, each task draws ``samples`` training examples, scores the masked
    trunk entries with ``estimator`` (``fs`` Eq. 10, ``efs`` Eq. 9, ``grad2``/``absgrad``
    Algorithm 2) on the dense trunk, and keeps its top ``keep_ratio`` entries
    (:func:`fsmtl_kernels.topk_mask_batched`, exact k, ties by position).

    Other arguments as :class:`~fsmtl.strategies.sparse.base.SparseStrategy`.
    """

    def __init__(
        self, keep_ratio: float | int, *, estimator: str = "fs", samples: int = 256, chunk_size: int = 32, **kwargs
    ) -> None:
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {tuple(ESTIMATORS)}, got {estimator!r}")
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise ValueError(f"samples must be a positive int, got {samples!r}")
        super().__init__(keep_ratio, **kwargs)
        self.estimator = estimator
        self.samples = samples
        self.chunk_size = chunk_size

    def fsmtl_options(self) -> dict:
        return {"estimator": self.estimator, "samples": self.samples, "chunk_size": self.chunk_size}

    def compute_mask(self) -> fk.PackedMask:
        return self.fsmtl.fisher_masks(self.context.sample)


def _fisher_sparse(estimator: str, options, cls: type[FisherSparse] = FisherSparse, **choices) -> FisherSparse:
    """A ``cls`` (FisherSparse or a variant) with ``estimator`` and the run's options."""
    return cls(
        options.keep_ratio,
        estimator=estimator,
        samples=options.samples,
        schedule=options.schedule,
        mask_forward=options.mask_forward,
        normalize=options.normalize,
        **choices,
    )


# One method per score estimator: FS, EFS, GRAD2 and ABSGRAD are FisherSparse with another score.
METHODS = tuple(
    Method(name, est.label, partial(_fisher_sparse, name), FisherSparse, variant=name, sparse=True)
    for name, est in ESTIMATORS.items()
)
