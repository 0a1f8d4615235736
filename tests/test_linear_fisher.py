"""linear_fisher on every backend: the identity ``sum_n (g_n a_n^T)**2 = (g*g)^T (a*a)``, bad input,
the Triton matmul (dtypes, strides, tile boundaries), the registered op."""

from __future__ import annotations

import pytest
import torch
from cases import GRAD_DTYPES, assert_unchanged, assert_within_torch_error, raises_naming, snapshot

import fsmtl_kernels as fk

# ---------------------------------------------------------------------------------------------
# Semantics, every backend
# ---------------------------------------------------------------------------------------------


def test_equals_per_sample_squares(backend):
    torch.manual_seed(3)
    g, a = torch.randn(9, 5), torch.randn(9, 7)
    w, b = torch.zeros(5, 7), torch.zeros(5)
    fk.linear_fisher(g, a, w, b, scale=0.5, backend=backend)
    per_sample = torch.einsum("no,ni->noi", g.double(), a.double())
    torch.testing.assert_close(w.double(), 0.5 * (per_sample**2).sum(0))
    torch.testing.assert_close(b.double(), 0.5 * (g.double() ** 2).sum(0))


def test_matches_float64(backend):
    gen = torch.Generator().manual_seed(9)
    g = torch.randn(33, 17, generator=gen)
    a = torch.randn(33, 123, generator=gen).bfloat16()
    wf, bf = torch.rand(17, 123, generator=gen), torch.rand(17, generator=gen)
    expected_w = wf.double() + 0.5 * (g.double().square().t() @ a.double().square())
    expected_b = bf.double() + 0.5 * g.double().square().sum(0)
    fk.linear_fisher(g, a, wf, bf, scale=0.5, backend=backend)
    torch.testing.assert_close(wf.double(), expected_w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bf.double(), expected_b, rtol=1e-5, atol=1e-5)


def test_strided_operands(backend):
    g = torch.randn(40, 9).t()  # [9, 40] with stride (1, 9): N=9 samples, out=40
    a = torch.randn(23, 9).t()  # [9, 23]
    wf_base = torch.zeros(23, 40)
    wf = wf_base.t()
    fk.linear_fisher(g, a, wf, None, backend=backend)
    torch.testing.assert_close(wf_base.t(), g.square().t() @ a.square())


def test_matches_fisher_accumulate_of_per_sample_gradients(backend):
    """The identity itself: equals summing squared per-sample gradients with fisher_accumulate."""
    layer = torch.nn.Linear(11, 6)
    x = torch.randn(5, 11)
    g = torch.randn(5, 6)
    per_sample_w = g[:, :, None] * x[:, None, :]
    wf, bf = torch.zeros(6, 11), torch.zeros(6)
    fk.linear_fisher(g, x, wf, bf, backend=backend)
    fw, fb = torch.zeros_like(layer.weight), torch.zeros_like(layer.bias)
    fk.fisher_accumulate([fw, fb], [per_sample_w, g], backend=backend)
    torch.testing.assert_close(wf, fw)
    torch.testing.assert_close(bf, fb)


# ---------------------------------------------------------------------------------------------
# Bad input: ValueError/TypeError naming the argument, nothing modified
# ---------------------------------------------------------------------------------------------


def test_rejects_and_keeps_buffers():
    g, a = torch.randn(4, 3), torch.randn(4, 5)
    w, b = torch.rand(3, 5), torch.rand(3)
    before = snapshot([w, b])
    raises_naming(ValueError, "weight_fisher", lambda: fk.linear_fisher(g, a, torch.zeros(5, 3), b))
    raises_naming(ValueError, "bias_fisher", lambda: fk.linear_fisher(g, a, w, torch.zeros(5)))
    raises_naming(ValueError, "inputs", lambda: fk.linear_fisher(g, a[:3], w, b))
    raises_naming(TypeError, "weight_fisher", lambda: fk.linear_fisher(g, a, w.double(), b))
    raises_naming(TypeError, "inputs", lambda: fk.linear_fisher(g, a.long(), w, b))
    # scale: the one rule of fisher_accumulate and the engine (TypeError for non-reals, ValueError
    # for NaN and infinities).
    raises_naming(TypeError, "scale", lambda: fk.linear_fisher(g, a, w, b, scale=True))
    raises_naming(TypeError, "scale", lambda: fk.linear_fisher(g, a, w, b, scale="0.5"))
    raises_naming(ValueError, "scale", lambda: fk.linear_fisher(g, a, w, b, scale=float("nan")))
    raises_naming(ValueError, "scale", lambda: fk.linear_fisher(g, a, w, b, scale=float("inf")))
    assert_unchanged(before, [w, b])


# ---------------------------------------------------------------------------------------------
# Triton kernel (CPU interpreter)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sizes", [(1, 1, 1), (7, 33, 17), (130, 65, 129)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", GRAD_DTYPES)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
def test_triton_matches_reference(triton, sizes, dtype, with_bias, blocks):
    n, n_out, n_in = sizes
    gen = torch.Generator().manual_seed(n)
    g = torch.randn(n, n_out, generator=gen).to(dtype)
    a = torch.randn(n, n_in, generator=gen).to(dtype)
    wf, bf = torch.rand(n_out, n_in, generator=gen), torch.rand(n_out, generator=gen)
    ours_w, ref_w = wf.clone(), wf.clone()
    ours_b, ref_b = (bf.clone(), bf.clone()) if with_bias else (None, None)
    fk.linear_fisher(g, a, ours_w, ours_b, scale=0.5, backend=triton)
    fk.linear_fisher(g, a, ref_w, ref_b, scale=0.5, backend="reference")
    g2, a2 = g.double().square(), a.double().square()
    assert_within_torch_error(ours_w, ref_w, wf.double() + 0.5 * g2.t() @ a2, "weight fisher")
    if with_bias:
        assert_within_torch_error(ours_b, ref_b, bf.double() + 0.5 * g2.sum(0), "bias fisher")


# ---------------------------------------------------------------------------------------------
# The registered op torch.ops.fsmtl.linear_fisher
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
def test_opcheck(with_bias):
    """Schema, fake, mutations and the AOT checks on the CPU kernel (the reference's GEMM)."""
    g, a = torch.randn(6, 5), torch.randn(6, 3)
    bias = torch.zeros(5) if with_bias else None
    torch.library.opcheck(torch.ops.fsmtl.linear_fisher.default, (g, a, torch.zeros(5, 3), bias, 0.5))


# ---------------------------------------------------------------------------------------------
# Triton on a CUDA GPU
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (no GPU here)")
@pytest.mark.parametrize("sizes", [(1, 1, 1), (7, 33, 17), (1000, 257, 129)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", GRAD_DTYPES)
def test_gpu_matches_reference(cuda, sizes, dtype):
    n, n_out, n_in = sizes
    g, a = torch.randn(n, n_out, device=cuda).to(dtype), torch.randn(n, n_in, device=cuda).to(dtype)
    ours_w, ours_b = torch.zeros(n_out, n_in, device=cuda), torch.zeros(n_out, device=cuda)
    ref_w, ref_b = ours_w.clone(), ours_b.clone()
    fk.linear_fisher(g, a, ours_w, ours_b, backend="triton")
    fk.linear_fisher(g, a, ref_w, ref_b, backend="reference")
    g2, a2 = g.double().square(), a.double().square()
    assert_within_torch_error(ours_w, ref_w, (g2.t() @ a2).cpu(), "weight fisher")
    assert_within_torch_error(ours_b, ref_b, g2.sum(0).cpu(), "bias fisher")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (no GPU here)")
def test_gpu_opcheck(cuda):
    g, a = torch.randn(6, 5, device=cuda), torch.randn(6, 3, device=cuda)
    for bias in (torch.zeros(5, device=cuda), None):
        torch.library.opcheck(torch.ops.fsmtl.linear_fisher.default, (g, a, torch.zeros(5, 3, device=cuda), bias, 0.5))
