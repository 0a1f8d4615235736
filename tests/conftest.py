"""Test set-up: Triton under its CPU interpreter where no GPU exists, and the backend fixtures.

``TRITON_INTERPRET`` must be set before any ``@triton.jit`` decorator runs, so it is set here,
before the test modules import the package.

Op tests take the ``backend`` fixture: one case per backend ("reference", "cpp", "triton"), and a
backend that cannot run here is a visible skip carrying its reason, never a silently smaller test.
Cases that only make sense for one backend take ``cpp`` or ``triton`` (the same, one backend).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import cases  # noqa: E402

from fsmtl_kernels import backends  # noqa: E402  (after TRITON_INTERPRET is set)

CPU = torch.device("cpu")


def backend_param(name: str):
    """``name`` as a pytest parameter, skipped with the reason when it cannot run on CPU tensors here."""
    reason = backends.unavailable_reason(name, CPU)
    marks = [pytest.mark.skipif(reason is not None, reason=f"{name} backend unavailable: {reason}")]
    if name == "triton":
        marks.append(pytest.mark.interpreter)
    return pytest.param(name, id=name, marks=marks)


@pytest.fixture(params=[backend_param(n) for n in ("reference", "cpp", "triton")])
def backend(request):
    return request.param


@pytest.fixture(params=[backend_param("cpp")])
def cpp(request):
    return request.param


@pytest.fixture(params=[backend_param("triton")])
def triton(request):
    return request.param


@pytest.fixture
def cuda():
    """A CUDA device the Triton kernels can run on, or a skip with the reason."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (no GPU here)")
    device = torch.device("cuda", torch.cuda.current_device())
    reason = backends.unavailable_reason("triton", device)
    if reason is not None:
        pytest.skip(reason)
    return device


@pytest.fixture(params=["default", "small"], ids=["default_blocks", "small_blocks"])
def blocks(request, monkeypatch):
    """Run a Triton test with the mode's block sizes and again with small blocks (many per parameter)."""
    if request.param == "small":
        _utils = pytest.importorskip("fsmtl_kernels.triton._utils", reason="triton is not installed")
        for op, size in cases.SMALL_BLOCKS.items():
            monkeypatch.setitem(_utils.INTERPRETER_BLOCKS, op, size)
        for op, size in cases.SMALL_GPU_BLOCKS.items():
            monkeypatch.setitem(_utils.GPU_BLOCKS, op, size)
    return request.param
