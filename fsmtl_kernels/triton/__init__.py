"""Triton backend: fused kernels for CUDA tensors (and CPU tensors under ``TRITON_INTERPRET=1``).

Each op lives in its own module: kernels and the launcher ``<op>_forward``, which takes the
arguments of the op's schema and is registered as the CUDA kernel of ``torch.ops.fsmtl.<op>``.
:data:`LAUNCHERS` maps op names to them for the interpreter, where the tensors are on the CPU
(see :func:`fsmtl_kernels.backends.kernel`). Importing this module raises ``ImportError`` when
Triton is not installed, which the dispatcher reports as the backend's unavailability reason.

``TRITON_INTERPRET=1`` must be set before this module is imported: ``@triton.jit`` picks the
interpreter when the kernels are defined.
"""

from __future__ import annotations

import torch
import triton  # noqa: F401  (ImportError here marks the backend unavailable)
from triton.runtime.interpreter import InterpretedFunction

from . import _utils
from .fisher_accumulate import _fisher_accumulate_kernel, fisher_accumulate_forward
from .fisher_topk import fisher_topk_forward
from .linear_fisher import linear_fisher_forward
from .masked_accumulate import masked_accumulate_forward, masked_accumulate_tasks_forward
from .masked_grad_average import masked_grad_average_forward
from .masked_matmul_accumulate import masked_matmul_accumulate_forward
from .topk_mask import topk_mask_forward

is_interpreter = _utils.is_interpreter

#: Op name -> launcher with the op's schema arguments.
LAUNCHERS = {
    "fisher_accumulate": fisher_accumulate_forward,
    "linear_fisher": linear_fisher_forward,
    "masked_accumulate": masked_accumulate_forward,
    "masked_accumulate_tasks": masked_accumulate_tasks_forward,
    "masked_grad_average": masked_grad_average_forward,
    "masked_matmul_accumulate": masked_matmul_accumulate_forward,
    "topk_mask": topk_mask_forward,
}

__all__ = ["LAUNCHERS", "fisher_topk_forward", "is_interpreter", "unavailable_reason"]


def _kernels_interpreted() -> bool:
    """Whether the kernels were defined for the interpreter (TRITON_INTERPRET=1 at import time)."""
    return isinstance(_fisher_accumulate_kernel, InterpretedFunction)


def unavailable_reason(device: torch.device) -> str | None:
    """None when the kernels can run on ``device`` tensors, else a one-line reason."""
    device = torch.device(device)
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if _kernels_interpreted():
            return None
        if is_interpreter():
            return (
                "TRITON_INTERPRET=1 was set after fsmtl_kernels.triton was imported; set it before importing "
                "fsmtl_kernels to run the Triton kernels on CPU under the interpreter"
            )
        return (
            "Triton kernels need CUDA tensors; set TRITON_INTERPRET=1 before importing fsmtl_kernels to run them "
            "on CPU under the interpreter"
        )
    return f"Triton kernels run on CUDA tensors (or CPU under TRITON_INTERPRET=1), not on {device.type}"
