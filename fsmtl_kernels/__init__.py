"""fsmtl-kernels: the three hot operations of Fisher Sparse Multi-Task Learning.

* :func:`fisher_accumulate` — squared (per-sample or batch) gradients into float32 Fisher buffers.
* :func:`topk_mask` / :func:`topk_mask_batched` — exact top-K over all shared parameters,
  as a bit-packed :class:`PackedMask`.
* :func:`masked_grad_average` — ``sum_t S_t * g_t / T`` (or per-entry selected count).
* :func:`masked_accumulate` — ``acc += S_t * g_t`` for one task: the same sum streamed task by task.
* :func:`fisher_topk` / :func:`fisher_topk_batched` — Fisher from gradients, then top-K.
* :func:`linear_fisher` — a Linear layer's Fisher from one batched backward, ``(g*g)^T (a*a)``.
* :func:`distributed_topk_mask` — exact top-K over scores sharded across ``torch.distributed`` ranks.
* :mod:`autograd_graph` — walks of the autograd graph (which leaves a loss reaches, and how often).
* :func:`unchecked_kernel` — an op's kernel without the public checks, for callers that checked once.

Every op takes ``backend="auto" | "reference" | "triton" | "cpp"`` (see :mod:`fsmtl_kernels.backends`).
Each op lives in the module of its name (``fsmtl_kernels/<op>.py``: public function, argument
checks, dispatch and the one ``torch.ops.fsmtl.<op>`` schema), with its kernels in
``reference/<op>.py``, ``triton/<op>.py`` and ``csrc/<op>.cpp``.
"""

from . import autograd_graph
from ._checks import check_k, resolve_k
from .backends import BackendUnavailableError, available_backends, unchecked_kernel
from .distributed_topk_mask import distributed_topk_mask, distributed_topk_mask_batched
from .fisher_accumulate import fisher_accumulate
from .fisher_topk import fisher_topk, fisher_topk_batched
from .linear_fisher import linear_fisher
from .masked_accumulate import masked_accumulate
from .masked_grad_average import NORMALIZE_MODES, masked_grad_average
from .masked_matmul_accumulate import masked_matmul_accumulate
from .packed_mask import PackedMask, popcount
from .topk_mask import topk_mask, topk_mask_batched

__version__ = "0.1.0"

__all__ = [
    "NORMALIZE_MODES",
    "BackendUnavailableError",
    "PackedMask",
    "autograd_graph",
    "available_backends",
    "check_k",
    "distributed_topk_mask",
    "distributed_topk_mask_batched",
    "fisher_accumulate",
    "fisher_topk",
    "fisher_topk_batched",
    "linear_fisher",
    "masked_accumulate",
    "masked_grad_average",
    "masked_matmul_accumulate",
    "popcount",
    "resolve_k",
    "topk_mask",
    "topk_mask_batched",
    "unchecked_kernel",
]
