"""C++/OpenMP backend for CPU tensors: loads ``csrc/``, whose kernels register for CPU tensors under
the ``torch.ops.fsmtl.*`` schemas defined in ``fsmtl_kernels/<op>.py``.

The kernels come from the extension ``fsmtl_kernels._C``, compiled by
``pip install --no-build-isolation -e .`` (or ``python setup.py build_ext --inplace``). When it is
not built and ``FSMTL_CPP_JIT=1`` is set, the same sources are compiled on first use with
:func:`torch.utils.cpp_extension.load` (needs a C++ compiler and ninja; cached in torch's
extensions directory). Otherwise :func:`unavailable_reason` names the cause, a warning is issued
once, and ``backend="auto"`` falls back to the reference.

Threads: every kernel uses ``at::parallel_for``, so it follows ``torch.set_num_threads`` /
``OMP_NUM_THREADS``. ``linear_fisher`` has no C++ kernel: its CPU kernel is the reference's GEMM.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

_CSRC = Path(__file__).resolve().parent.parent / "csrc"


def _jit_build() -> None:
    """Compile ``csrc/`` with ninja into torch's extension cache and load it (registers the ops)."""
    from torch.utils.cpp_extension import load

    sources = sorted(_CSRC.glob("*.cpp"))
    if not sources:
        raise ImportError(f"no C++ sources in {_CSRC}; JIT needs a source checkout")
    load(
        name="fsmtl_kernels_C",
        sources=[str(p) for p in sources],
        extra_include_paths=[str(_CSRC)],
        extra_cflags=["-O3", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
        is_python_module=False,
    )


BUILD_ERROR_FILE = Path(__file__).resolve().parent / "_build_error.txt"
"""Where ``setup.py`` records why the extension was not built (the compiler's first error lines);
removed by a successful build."""


def build_error() -> str | None:
    """The build failure ``setup.py`` recorded at install time, or None when there is none."""
    try:
        text = BUILD_ERROR_FILE.read_text(errors="replace").strip()
    except OSError:
        return None
    return text or None


def _not_built_cause(exc: ImportError) -> str:
    recorded = build_error()
    if recorded is not None:
        first = recorded.splitlines()[0]
        return f"fsmtl_kernels._C was not built at install time: {first} (details: `fsmtl info` or {BUILD_ERROR_FILE})"
    built = sorted(BUILD_ERROR_FILE.parent.glob("_C.*"))
    if built:
        return f"fsmtl_kernels._C is built ({built[0].name}) but does not load: {exc}"
    return (
        "fsmtl_kernels._C is not built and no build failure was recorded (installed without the C++ build, "
        "e.g. by an isolated `pip install`)"
    )


def _load_extension() -> str | None:
    """Load the ops once; the reason they are unavailable, or None. Warns once on failure."""
    try:
        from . import _C  # noqa: F401  (importing registers the CPU kernels of torch.ops.fsmtl.*)

        return None
    except ImportError as exc:
        cause = _not_built_cause(exc)
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


def unavailable_reason(device: torch.device) -> str | None:
    """None when the C++ kernels can run on ``device``; otherwise a one-line reason."""
    if _REASON is not None:
        return _REASON
    if device.type != "cpu":
        return f"the C++ backend runs on CPU tensors only, not {device.type}"
    return None
