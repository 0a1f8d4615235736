"""Backend selection: ``"auto" | "reference" | "triton" | "cpp"``.

``auto`` takes the Triton kernels for CUDA tensors, the C++ extension for CPU tensors when it
is built, and the reference otherwise. The ``backend=`` argument of every op, or the
``FSMTL_BACKEND`` environment variable when the argument is ``"auto"``, forces one backend;
forcing one that cannot run on the inputs' device raises :class:`BackendUnavailableError`
instead of silently falling back.

Every op has one schema, ``torch.ops.fsmtl.<op>``, defined in ``fsmtl_kernels/<op>.py``: the
C++ kernel is registered for the CPU dispatch key and the Triton kernel for CUDA, so "cpp" and
"triton" both run through the op (:func:`kernel`). The backend modules
(:mod:`fsmtl_kernels.cpp`, :mod:`fsmtl_kernels.triton`) load their kernels and expose
``unavailable_reason(device) -> str | None``.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from types import ModuleType

import torch

from . import reference

BACKENDS = ("auto", "reference", "triton", "cpp")
_MODULES = {"triton": "fsmtl_kernels.triton", "cpp": "fsmtl_kernels.cpp"}


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run here (not built, not installed, or wrong device)."""


def _load(name: str) -> tuple[ModuleType | None, str | None]:
    try:
        return importlib.import_module(_MODULES[name]), None
    except ImportError as exc:
        return None, f"{name} backend could not be imported: {exc}"


def unavailable_reason(name: str, device: torch.device) -> str | None:
    """Why backend ``name`` cannot run on ``device``, or None when it can."""
    if name == "reference":
        return None
    module, reason = _load(name)
    return reason if module is None else module.unavailable_reason(torch.device(device))


def requested_backend(backend: str) -> str:
    """The backend a call asks for: the argument, or ``FSMTL_BACKEND`` when the argument is auto."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
    if backend == "auto":
        env = os.environ.get("FSMTL_BACKEND", "auto") or "auto"
        if env not in BACKENDS:
            raise ValueError(f"FSMTL_BACKEND={env!r} is not one of {BACKENDS}")
        return env
    return backend


def select(backend: str, device: torch.device) -> ModuleType:
    """The backend module that runs an op on tensors on ``device``."""
    name = requested_backend(backend)
    if name == "auto":
        preferred = "triton" if device.type == "cuda" else "cpp" if device.type == "cpu" else None
        if preferred is not None and unavailable_reason(preferred, device) is None:
            return _load(preferred)[0]
        return reference
    reason = unavailable_reason(name, device)
    if reason is not None:
        raise BackendUnavailableError(f"backend={name!r} is not available for {device} tensors: {reason}")
    return reference if name == "reference" else _load(name)[0]


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backends that can run on ``device`` here."""
    device = torch.device(device)
    return [n for n in BACKENDS[1:] if unavailable_reason(n, device) is None]


def kernel(op: str, backend: str, device: torch.device) -> Callable:
    """The function that runs ``op`` for ``backend`` on ``device`` tensors, taking the arguments of
    the op's schema ``torch.ops.fsmtl.<op>``: the reference, or the op itself, whose dispatch key
    picks the C++ (CPU) or Triton (CUDA) kernel."""
    impl = select(backend, device)
    if impl is reference:
        return getattr(reference, op)
    if impl.__name__ == _MODULES["triton"] and device.type != "cuda":
        # Triton under TRITON_INTERPRET=1 runs on CPU tensors, but the op's CPU dispatch key
        # belongs to the C++ kernel (or to nothing when it is not built): call the launcher.
        return impl.LAUNCHERS[op]
    return getattr(torch.ops.fsmtl, op)


#: The ops whose every backend takes the arguments of the schema (``masked_grad_average``'s
#: reference takes unpacked masks instead, so it has no unchecked kernel).
UNCHECKED_OPS = (
    "fisher_accumulate",
    "linear_fisher",
    "masked_accumulate",
    "masked_accumulate_tasks",
    "masked_matmul_accumulate",
    "topk_mask",
)


def unchecked_kernel(op: str, device: torch.device | str, backend: str = "auto") -> Callable:
    """The kernel that runs ``op`` on ``device`` tensors, without the argument checks of the public
    function ``fsmtl_kernels.<op>``: it takes the arguments of the op's schema
    (``torch.ops.fsmtl.<op>``; a :class:`~fsmtl_kernels.PackedMask` is passed as its ``words`` and
    ``word_offsets``). For a caller that checked its arguments once and then calls the op many
    times with arguments of the same shapes (the masked backward adds every task's gradient of
    every parameter), where the per-call checks would cost as much as the kernel. Wrong arguments
    are undefined behaviour here: check them as the public function does first."""
    if op not in UNCHECKED_OPS:
        raise ValueError(f"op={op!r} is not one of {UNCHECKED_OPS}")
    return kernel(op, backend, torch.device(device))
