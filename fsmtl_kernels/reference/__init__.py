"""Plain-PyTorch reference of every op: it defines the semantics the other backends match.

These functions take validated arguments (see the public functions in ``fsmtl_kernels``) and run
on any device. ``fisher_accumulate``, ``topk_mask``, ``linear_fisher``, ``masked_accumulate`` and
``masked_accumulate_tasks`` take the arguments of their ``torch.ops.fsmtl`` schema;
``masked_grad_average`` takes the mask's unpacked bool tensors.
"""

from .fisher_accumulate import fisher_accumulate
from .linear_fisher import linear_fisher
from .masked_accumulate import masked_accumulate, masked_accumulate_tasks
from .masked_grad_average import masked_grad_average
from .masked_matmul_accumulate import masked_matmul_accumulate
from .topk_mask import topk_mask

__all__ = [
    "fisher_accumulate",
    "linear_fisher",
    "masked_accumulate",
    "masked_accumulate_tasks",
    "masked_grad_average",
    "masked_matmul_accumulate",
    "topk_mask",
]
