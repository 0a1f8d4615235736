"""C++/OpenMP backend for CPU tensors: the kernels of ``csrc/`` registered as ``torch.ops.fsmtl.*``.

The kernels come from the extension ``fsmtl_kernels._C``, compiled by
``pip install --no-build-isolation -e .`` (or ``python setup.py build_ext --inplace``). When it is
not built and ``FSMTL_CPP_JIT=1`` is set, the same sources are compiled on first use with
:func:`torch.utils.cpp_extension.load` (needs a C++ compiler and ninja; cached in torch's
extensions directory). Otherwise :func:`unavailable_reason` names the cause, a warning is issued
once, and ``backend="auto"`` falls back to the reference.

Threads: every kernel uses ``at::parallel_for``, so it follows ``torch.set_num_threads`` /
``OMP_NUM_THREADS``. The functions below take arguments already validated by the public ops.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from .mask import PackedMask, word_layout

_CSRC = Path(__file__).resolve().parent.parent / "csrc"
_JIT_SOURCES = ("ops.cpp", "fisher_accumulate.cpp", "topk_mask.cpp", "masked_grad_average.cpp")


def _jit_build() -> None:
    """Compile ``csrc/`` with ninja into torch's extension cache and load it (registers the ops)."""
    from torch.utils.cpp_extension import load

    sources = [_CSRC / name for name in _JIT_SOURCES]
    missing = [str(p) for p in sources if not p.is_file()]
    if missing:
        raise ImportError(f"C++ sources not found ({', '.join(missing)}); JIT needs a source checkout")
    load(
        name="fsmtl_kernels_C",
        sources=[str(p) for p in sources],
        extra_include_paths=[str(_CSRC)],
        extra_cflags=["-O3", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
        is_python_module=False,
    )


def _load_extension() -> str | None:
    """Load the ops once; the reason they are unavailable, or None. Warns once on failure."""
    try:
        from . import _C  # noqa: F401  (importing registers torch.ops.fsmtl.*)

        return None
    except ImportError as exc:
        cause = f"fsmtl_kernels._C is not built: {exc}"
    if os.environ.get("FSMTL_CPP_JIT") == "1":
        try:
            _jit_build()
            return None
        except Exception as exc:  # noqa: BLE001 - a compiler or ninja failure of any kind makes the backend unavailable
            reason = f"{cause}; FSMTL_CPP_JIT=1 compile failed: {type(exc).__name__}: {str(exc).splitlines()[0]}"
    else:
        reason = (
            f"{cause}; reinstall with `pip install --no-build-isolation -e .` "
            "(or set FSMTL_CPP_JIT=1 to compile on first use)"
        )
    warnings.warn(f"fsmtl_kernels C++ backend unavailable: {reason}", RuntimeWarning, stacklevel=3)
    return reason


_REASON = _load_extension()

if _REASON is None:

    @torch.library.register_fake("fsmtl::topk_mask")
    def _topk_mask_fake(scores, ks):
        num_tasks = scores[0].shape[0]
        numels = [s[0].numel() for s in scores]
        words = sum(-(-n // 32) for n in numels)
        return scores[0].new_empty((num_tasks, words), dtype=torch.int32)

    @torch.library.register_fake("fsmtl::fisher_accumulate")
    def _fisher_accumulate_fake(fisher, grads, scale, per_sample):
        return None

    @torch.library.register_fake("fsmtl::masked_grad_average")
    def _masked_grad_average_fake(grads, words, word_offsets, selected, out):
        return None


def unavailable_reason(device: torch.device) -> str | None:
    """None when the C++ kernels can run on ``device``; otherwise a one-line reason."""
    if _REASON is not None:
        return _REASON
    if device.type != "cpu":
        return f"the C++ backend runs on CPU tensors only, not {device.type}"
    return None


def _writable(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Contiguous tensors the kernel may write; non-contiguous ones get a contiguous copy."""
    return [t if t.is_contiguous() else t.contiguous() for t in tensors]


def _write_back(targets: list[torch.Tensor], results: list[torch.Tensor]) -> None:
    for target, result in zip(targets, results, strict=True):
        if result is not target:
            target.copy_(result)


def fisher_accumulate(fisher: list[torch.Tensor], grads: list[torch.Tensor], scale: float, per_sample: bool) -> None:
    """``F_i += scale * sum_n g_in**2`` (per-sample ``[N, *shape_i]``) or ``F_i += scale * g_i**2``.

    ``fisher``: float32 ``shape_i``, updated in place; ``grads``: fp16/bf16/fp32, squared in float32.
    """
    work = _writable(fisher)
    torch.ops.fsmtl.fisher_accumulate(work, [g.contiguous() for g in grads], float(scale), bool(per_sample))
    _write_back(fisher, work)


def topk_mask(scores: list[torch.Tensor], ks: list[int]) -> torch.Tensor:
    """Exactly ``ks[t]`` ones per task (ties at the threshold in position order) as int32 words ``[T, W]``.

    ``scores``: contiguous float32 ``[T, *shape_i]`` without NaN (checked by the public op).
    """
    return torch.ops.fsmtl.topk_mask([s.float().contiguous() for s in scores], [int(k) for k in ks])


def masked_grad_average(grads: list[torch.Tensor], mask: PackedMask, normalize: str, out: list[torch.Tensor]) -> None:
    """``out_i = sum_t S_ti * g_ti / T`` or ``/ sum_t S_ti`` (``normalize="selected"``, 0 where none).

    ``grads``: ``[T, *shape_i]`` fp16/bf16/fp32, summed in float32; ``out``: ``shape_i`` in
    fp16/bf16/fp32/fp64, overwritten.
    """
    offsets, _ = word_layout(mask.numels)
    work = _writable(out)
    torch.ops.fsmtl.masked_grad_average(
        [g.contiguous() for g in grads], mask.words.contiguous(), offsets, normalize == "selected", work
    )
    _write_back(out, work)


def linear_fisher(
    grad_output: torch.Tensor,
    inputs: torch.Tensor,
    weight_fisher: torch.Tensor,
    bias_fisher: torch.Tensor | None,
    scale: float,
) -> None:
    """``weight_fisher += scale * (g*g)^T (a*a)``, ``bias_fisher += scale * sum_n g_n**2``.

    The product is a BLAS GEMM on the squared operands (``addmm_`` accumulates in place, no
    ``[out, in]`` temporary); squaring ``[N, out]`` and ``[N, in]`` is small next to it.
    """
    g2 = grad_output.float().square()
    weight_fisher.addmm_(g2.t(), inputs.float().square(), beta=1.0, alpha=scale)
    if bias_fisher is not None:
        bias_fisher.add_(g2.sum(0), alpha=scale)
