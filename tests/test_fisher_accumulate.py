"""fisher_accumulate on every backend: semantics against a float64 oracle, bad input, the C++ and
Triton kernels (strides, dtypes, alignment groups, block boundaries), the registered op."""

from __future__ import annotations

import pytest
import torch
from cases import (
    GRAD_DTYPES,
    ODD_SHAPES,
    SHAPE_IDS,
    SHAPES,
    assert_unchanged,
    assert_within_torch_error,
    raises_naming,
    snapshot,
)
from oracle import fisher_oracle

import fsmtl_kernels as fk
from fsmtl_kernels import reference

LARGE_P = 100_000_000


# ---------------------------------------------------------------------------------------------
# Semantics, every backend
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "atol", "rtol"),
    [(torch.float32, 1e-5, 1e-5), (torch.float16, 1e-5, 1e-5), (torch.bfloat16, 1e-5, 1e-5)],
)
@pytest.mark.parametrize("per_sample", [True, False])
def test_matches_float64(backend, dtype, atol, rtol, per_sample):
    torch.manual_seed(0)
    shapes = [(1,), (7,), (3, 5), (2, 3, 4)]
    grads = [torch.randn((4, *s) if per_sample else s).to(dtype) for s in shapes]
    fisher = [torch.full(s, 0.5) for s in shapes]
    fk.fisher_accumulate(fisher, grads, scale=0.25, backend=backend)
    # grads are exactly representable in float32, so the only error is float32 summation.
    for f, ref in zip(fisher, fisher_oracle(grads, per_sample)):
        torch.testing.assert_close(f.double(), 0.5 + 0.25 * ref, atol=atol, rtol=rtol)


def test_fp16_squares_do_not_overflow(backend):
    g = torch.full((2, 3), 60000.0, dtype=torch.float16)
    fisher = [torch.zeros(3)]
    fk.fisher_accumulate(fisher, [g], backend=backend)
    assert torch.isfinite(fisher[0]).all()
    torch.testing.assert_close(fisher[0], torch.full((3,), 2 * 60000.0**2))


def test_returns_the_same_buffers(backend):
    fisher = [torch.zeros(3)]
    out = fk.fisher_accumulate(fisher, [torch.ones(3)], backend=backend)
    assert out[0] is fisher[0]


def test_strided_views_and_mixed_dtypes(backend):
    """Non-contiguous Fisher views (written through) and gradients, and two gradient dtypes."""
    base = torch.zeros(33, 31)
    fisher = [base.t(), torch.zeros(7)]  # [31, 33] transposed view
    grads = [torch.randn(4, 33, 31).transpose(1, 2), torch.randn(4, 7, dtype=torch.float16)]
    fk.fisher_accumulate(fisher, grads, backend=backend)
    assert fisher[0].data_ptr() == base.data_ptr()
    torch.testing.assert_close(fisher[0], grads[0].square().sum(0))
    torch.testing.assert_close(fisher[1], grads[1].float().square().sum(0))


# ---------------------------------------------------------------------------------------------
# Bad input: ValueError/TypeError naming the argument, nothing modified
# ---------------------------------------------------------------------------------------------

FISHER_CASES = [
    ("empty fisher", TypeError, "fisher", lambda f, g: fk.fisher_accumulate(f[0], g)),
    ("empty list", ValueError, "fisher", lambda f, g: fk.fisher_accumulate([], g)),
    ("length mismatch", ValueError, "grads", lambda f, g: fk.fisher_accumulate(f, g[:1])),
    ("integer grads", TypeError, "grads[1]", lambda f, g: fk.fisher_accumulate(f, [g[0], g[1].long()])),
    ("float64 fisher", TypeError, "fisher[0]", lambda f, g: fk.fisher_accumulate([f[0].double(), f[1]], g)),
    (
        "trailing shape differs",
        ValueError,
        "grads[1]",
        lambda f, g: fk.fisher_accumulate(f, [g[0], torch.ones(4, 2, 2)]),
    ),
    ("mixed sample counts", ValueError, "grads[1]", lambda f, g: fk.fisher_accumulate(f, [g[0], torch.ones(3, 2, 3)])),
    ("batch shape differs", ValueError, "grads[0]", lambda f, g: fk.fisher_accumulate(f, [torch.ones(4), g[1][0]])),
    ("bool scale", TypeError, "scale", lambda f, g: fk.fisher_accumulate(f, g, scale=True)),
    ("string scale", TypeError, "scale", lambda f, g: fk.fisher_accumulate(f, g, scale="1")),
    ("nan scale", ValueError, "scale", lambda f, g: fk.fisher_accumulate(f, g, scale=float("nan"))),
    ("inf scale", ValueError, "scale", lambda f, g: fk.fisher_accumulate(f, g, scale=float("-inf"))),
    ("meta device", ValueError, "grads", lambda f, g: fk.fisher_accumulate(f, [t.to("meta") for t in g])),
    ("unknown backend", ValueError, "backend", lambda f, g: fk.fisher_accumulate(f, g, backend="cuda")),
]


@pytest.mark.parametrize(("case", "exc", "name", "call"), FISHER_CASES, ids=[c[0] for c in FISHER_CASES])
def test_rejects(case, exc, name, call):
    fisher = [torch.rand(3), torch.rand(2, 3)]
    grads = [torch.randn(4, 3), torch.randn(4, 2, 3)]
    before, before_g = snapshot(fisher), snapshot(grads)
    raises_naming(exc, name, lambda: call(fisher, grads))
    assert_unchanged(before, fisher)
    assert_unchanged(before_g, grads)


# ---------------------------------------------------------------------------------------------
# C++ kernel
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", GRAD_DTYPES)
@pytest.mark.parametrize("shapes", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("per_sample", [True, False])
def test_cpp_matches_float64(cpp, shapes, dtype, per_sample):
    gen = torch.Generator().manual_seed(5)
    n = 5
    fisher = [torch.rand(s, generator=gen) for s in shapes]
    grads = [torch.randn((n, *s) if per_sample else s, generator=gen).to(dtype) for s in shapes]
    expected = []
    for f, g in zip(fisher, grads, strict=True):
        sq = g.double().square()
        expected.append(f.double() + 0.25 * (sq.sum(0) if per_sample else sq))
    fk.fisher_accumulate(fisher, grads, scale=0.25, backend=cpp)
    for f, e in zip(fisher, expected, strict=True):
        assert f.dtype == torch.float32
        torch.testing.assert_close(f.double(), e, rtol=2e-6, atol=1e-6)


def test_cpp_half_squares_do_not_overflow_and_views_are_written(cpp):
    grads = [torch.full((4, 3, 5), 60000.0, dtype=torch.float16)]
    base = torch.zeros(5, 3)
    fisher = [base.t()]  # a non-contiguous view: the backend must write through it
    fk.fisher_accumulate(fisher, grads, backend=cpp)
    assert torch.isfinite(base).all()
    torch.testing.assert_close(base, torch.full((5, 3), 4 * 60000.0**2))


def test_cpp_deterministic_across_threads(cpp):
    gen = torch.Generator().manual_seed(4)
    grads = [torch.randn(8, 50_000, generator=gen).half(), torch.randn(8, 123, generator=gen)]
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            fisher = [torch.zeros(g.shape[1:]) for g in grads]
            fk.fisher_accumulate(fisher, grads, backend=cpp)
            outs.append(fisher)
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*outs, strict=True):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# Triton kernel (CPU interpreter)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", GRAD_DTYPES)
@pytest.mark.parametrize("per_sample", [True, False], ids=["per_sample", "batch"])
def test_triton_matches_reference(triton, dtype, per_sample, blocks):
    gen = torch.Generator().manual_seed(2)
    n = 5
    grads = [
        (torch.randn((n, *s) if per_sample else s, generator=gen) * 300).to(dtype)  # fp16 squares overflow
        for s in ODD_SHAPES
    ]
    start = [torch.rand(s, generator=gen) for s in ODD_SHAPES]
    ours = [f.clone() for f in start]
    ref = [f.clone() for f in start]
    fk.fisher_accumulate(ours, grads, scale=0.25, backend=triton)
    reference.fisher_accumulate(ref, grads, 0.25, per_sample)
    exact = [f.double() + 0.25 * o for f, o in zip(start, fisher_oracle(grads, per_sample), strict=True)]
    for o, r, e in zip(ours, ref, exact, strict=True):
        assert torch.isfinite(o).all()
        torch.testing.assert_close(o, r, rtol=2e-6, atol=0)
        assert_within_torch_error(o, r, e, "fisher")


def test_triton_alignment_groups(triton, blocks):
    shapes = [(7,), (64,), (33,), (8, 16), (1,)]
    grads = [torch.randn(3, *s) for s in shapes]
    flat = torch.zeros(1 + 64)
    fisher = [torch.zeros(s) for s in shapes] + [flat[1:]]  # a misaligned view of a flat buffer
    fk.fisher_accumulate(fisher, [*grads, torch.randn(3, 64)], backend=triton)
    for f, g in zip(fisher[:-1], grads, strict=True):
        torch.testing.assert_close(f, g.square().sum(0))


# ---------------------------------------------------------------------------------------------
# The registered op torch.ops.fsmtl.fisher_accumulate
# ---------------------------------------------------------------------------------------------


def test_opcheck(cpp):
    gen = torch.Generator().manual_seed(6)
    fisher = [torch.rand(5, 7, generator=gen), torch.rand(40, generator=gen)]
    grads = [torch.randn(4, 5, 7, generator=gen), torch.randn(4, 40, generator=gen)]
    torch.library.opcheck(torch.ops.fsmtl.fisher_accumulate.default, (fisher, grads, 0.5, True))


# ---------------------------------------------------------------------------------------------
# Triton on a CUDA GPU
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (no GPU here)")
@pytest.mark.parametrize("dtype", GRAD_DTYPES)
@pytest.mark.parametrize("per_sample", [True, False], ids=["per_sample", "batch"])
def test_gpu_matches_reference(cuda, dtype, per_sample, blocks):
    grads = [(torch.randn((5, *s) if per_sample else s, device=cuda) * 300).to(dtype) for s in ODD_SHAPES]
    ours = [torch.rand(s, device=cuda) for s in ODD_SHAPES]
    ref = [f.clone() for f in ours]
    exact = [f.double() for f in ours]
    fk.fisher_accumulate(ours, grads, scale=0.25, backend="triton")
    fk.fisher_accumulate(ref, grads, scale=0.25, backend="reference")
    for o, r, e, g in zip(ours, ref, exact, grads, strict=True):
        sq = g.double().square()
        exact_total = (e + 0.25 * (sq.sum(0) if per_sample else sq)).cpu()
        assert_within_torch_error(o, r, exact_total, "fisher")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (no GPU here)")
def test_gpu_large_p(cuda):
    grads = [torch.randn(LARGE_P, device=cuda, dtype=torch.float16)]
    ours, ref = [torch.zeros(LARGE_P, device=cuda)], [torch.zeros(LARGE_P, device=cuda)]
    fk.fisher_accumulate(ours, grads, backend="triton")
    fk.fisher_accumulate(ref, grads, backend="reference")
    assert torch.equal(ours[0], ref[0])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (no GPU here)")
def test_gpu_opcheck(cuda):
    grads = [torch.randn(4, *s, device=cuda) for s in [(7,), (3, 5)]]
    fisher = [torch.zeros(g.shape[1:], device=cuda) for g in grads]
    torch.library.opcheck(torch.ops.fsmtl.fisher_accumulate.default, (fisher, grads, 0.5, True))
