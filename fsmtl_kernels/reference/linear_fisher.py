from __future__ import annotations


def linear_fisher(grad_output, inputs, weight_fisher, bias_fisher, scale: float) -> None:
    """The semantics of ``torch.ops.fsmtl.linear_fisher`` (arguments as in
    :func:`fsmtl_kernels.linear_fisher`), and its CPU kernel.

    The per-sample weight gradient is ``g_n a_n^T``, so ``sum_n (g_n a_n^T)**2 = (g*g)^T (a*a)``
    and the bias term is ``sum_n g_n**2``. Operands are squared in float32; the product is a BLAS
    GEMM that accumulates into ``weight_fisher`` in place (``addmm_``: no ``[out, in]`` temporary).
    """
    g2 = grad_output.float().square()
    weight_fisher.addmm_(g2.t(), inputs.float().square(), beta=1.0, alpha=scale)
    if bias_fisher is not None:
        bias_fisher.add_(g2.sum(0), alpha=scale)
