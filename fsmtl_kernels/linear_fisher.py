"""``linear_fisher``: a Linear layer's Fisher from one batched backward, ``(g*g)^T (a*a)``.

The op ``torch.ops.fsmtl.linear_fisher`` is defined here once. On CPU its kernel is the
reference itself, :func:`fsmtl_kernels.reference.linear_fisher` (one BLAS ``addmm_`` on the
squared operands: a C++ kernel would be the same GEMM), so ``backend="cpp"`` runs it too; on
CUDA it is the Triton matmul of :mod:`fsmtl_kernels.triton.linear_fisher`.
"""

from __future__ import annotations

import torch

from . import _checks, backends, reference

torch.library.define(
    "fsmtl::linear_fisher",
    "(Tensor grad_output, Tensor inputs, Tensor(a!) weight_fisher, Tensor(b!)? bias_fisher, float scale) -> ()",
)
torch.library.register_kernel("fsmtl::linear_fisher", "cpu", reference.linear_fisher)


@torch.library.register_fake("fsmtl::linear_fisher")
def _(grad_output, inputs, weight_fisher, bias_fisher, scale):
    return None


def _check_args(grad_output, inputs, weight_fisher, bias_fisher, scale) -> float:
    for name, t in (("grad_output", grad_output), ("inputs", inputs), ("weight_fisher", weight_fisher)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    _checks.floating([grad_output], "grad_output")
    _checks.floating([inputs], "inputs")
    _checks.floating([weight_fisher], "weight_fisher", _checks.FISHER_DTYPES)
    if grad_output.dim() != 2 or inputs.dim() != 2 or grad_output.shape[0] != inputs.shape[0]:
        raise ValueError(
            f"grad_output {tuple(grad_output.shape)} and inputs {tuple(inputs.shape)} must be [N, out] and [N, in]"
        )
    if weight_fisher.shape != (grad_output.shape[1], inputs.shape[1]):
        raise ValueError(
            f"weight_fisher has shape {tuple(weight_fisher.shape)}; expected {(grad_output.shape[1], inputs.shape[1])}"
        )
    tensors = [grad_output, inputs, weight_fisher]
    if bias_fisher is not None:
        if not isinstance(bias_fisher, torch.Tensor):
            raise TypeError(f"bias_fisher must be a torch.Tensor or None, got {type(bias_fisher).__name__}")
        _checks.floating([bias_fisher], "bias_fisher", _checks.FISHER_DTYPES)
        if bias_fisher.shape != (grad_output.shape[1],):
            raise ValueError(f"bias_fisher has shape {tuple(bias_fisher.shape)}; expected {(grad_output.shape[1],)}")
        tensors.append(bias_fisher)
    for name, t in zip(("grad_output", "inputs", "weight_fisher", "bias_fisher"), tensors):
        if t.device != grad_output.device:
            raise ValueError(f"{name} is on {t.device} but grad_output is on {grad_output.device}")
    return _checks.check_scale(scale)


def linear_fisher(
    grad_output: torch.Tensor,
    inputs: torch.Tensor,
    weight_fisher: torch.Tensor,
    bias_fisher: torch.Tensor | None = None,
    *,
    scale: float = 1.0,
    backend: str = "auto",
) -> None:
    """Fisher of a Linear layer from one batched backward: no per-sample gradients are formed.

    ``weight_fisher += scale * (g*g)^T (a*a)`` and ``bias_fisher += scale * sum_n g_n**2``, which
    equal the sums of squared per-sample gradients ``g_n a_n^T`` and ``g_n``.

    Args:
        grad_output: ``[N, out]`` gradients of the loss w.r.t. the layer's output (fp16/bf16/fp32).
        inputs: ``[N, in]`` the layer's inputs (fp16/bf16/fp32), same device.
        weight_fisher: float32 ``[out, in]``, updated in place.
        bias_fisher: float32 ``[out]`` or None, updated in place.
        scale: a finite real number multiplying the sums.
        backend: ``"auto" | "reference" | "triton" | "cpp"``.
    """
    scale = _check_args(grad_output, inputs, weight_fisher, bias_fisher, scale)
    run = backends.kernel("linear_fisher", backend, grad_output.device)
    run(grad_output, inputs, weight_fisher, bias_fisher, scale)
