from __future__ import annotations

import torch


def linear_fisher(
    grad_output: torch.Tensor,
    inputs: torch.Tensor,
    weight_fisher: torch.Tensor,
    bias_fisher: torch.Tensor | None,
    scale: float,
) -> None:
    """Sum over samples of squared per-sample gradients of a Linear layer, without forming them.

    The per-sample weight gradient is ``g_n a_n^T``, so ``sum_n (g_n a_n^T)**2 = (g*g)^T (a*a)``
    and the bias term is ``sum_n g_n**2``. ``grad_output``: ``[N, out]``, ``inputs``: ``[N, in]``
    (fp16/bf16/fp32, squared in float32). ``weight_fisher``: float32 ``[out, in]`` and
    ``bias_fisher``: float32 ``[out]``, updated in place.
    """
    g2 = grad_output.float().square()
    weight_fisher.add_(g2.t() @ inputs.float().square(), alpha=scale)
    if bias_fisher is not None:
        bias_fisher.add_(g2.sum(0), alpha=scale)
