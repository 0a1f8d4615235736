"""Triton backend: fused kernels for CUDA tensors (and CPU tensors under ``TRITON_INTERPRET=1``).

Each op lives in its own module (kernels, launcher, ``torch.library`` registration under the
``fsmtl_triton`` namespace); the functions here have the reference signatures and are what
:mod:`fsmtl_kernels.backends` dispatches to. Importing this module raises ``ImportError`` when
Triton is not installed, which the dispatcher reports as the backend's unavailability reason.

``TRITON_INTERPRET=1`` must be set before this module is imported: ``@triton.jit`` picks the
interpreter when the kernels are defined.
"""

from __future__ import annotations

import torch
import triton  # noqa: F401  (ImportError here marks the backend unavailable)
from triton.runtime.interpreter import InterpretedFunction

from ..mask import PackedMask
from . import _utils
from .fisher_accumulate import _fisher_accumulate_kernel, fisher_accumulate_op
from .linear_fisher import linear_fisher_op
from .masked_grad_average import masked_grad_average_op
from .topk_mask import topk_mask_op

is_interpreter = _utils.is_interpreter

__all__ = [
    "fisher_accumulate",
    "is_interpreter",
    "linear_fisher",
    "masked_grad_average",
    "topk_mask",
    "unavailable_reason",
]


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


def fisher_accumulate(fisher: list[torch.Tensor], grads: list[torch.Tensor], scale: float, per_sample: bool) -> None:
    """``F_i += scale * sum_n g_in**2`` (or ``scale * g_i**2``) over all parameters in one launch."""
    fisher_accumulate_op(list(fisher), list(grads), float(scale), bool(per_sample))


def topk_mask(scores: list[torch.Tensor], ks: list[int]) -> torch.Tensor:
    """int32 words ``[T, W]``: exactly ``ks[t]`` ones per task, ties in position order."""
    return topk_mask_op(list(scores), [int(k) for k in ks])


def masked_grad_average(grads: list[torch.Tensor], mask: PackedMask, normalize: str, out: list[torch.Tensor]) -> None:
    """Write ``sum_t S_t * g_t / T`` (or ``/ sum_t S_t``) into ``out``, one launch."""
    masked_grad_average_op(list(grads), mask.words, normalize, list(out))


def linear_fisher(
    grad_output: torch.Tensor,
    inputs: torch.Tensor,
    weight_fisher: torch.Tensor,
    bias_fisher: torch.Tensor | None,
    scale: float,
) -> None:
    """``weight_fisher += scale * (g*g)^T (a*a)`` and ``bias_fisher += scale * sum_n g_n**2``."""
    linear_fisher_op(grad_output, inputs, weight_fisher, bias_fisher, float(scale))
