"""fisher_topk / fisher_topk_batched on every backend: Fisher from gradients, then the exact top-K."""

from __future__ import annotations

import pytest
import torch
from cases import raises_naming
from oracle import topk_oracle

import fsmtl_kernels as fk


def test_single_and_batched_agree(backend):
    torch.manual_seed(2)
    params = [torch.zeros(5, 3), torch.zeros(4)]
    grads_a = [torch.randn(6, *p.shape) for p in params]
    grads_b = [torch.randn(*p.shape) for p in params]
    single_a = fk.fisher_topk(params, grads_a, 7, backend=backend)
    single_b = fk.fisher_topk(params, grads_b, 0.5, backend=backend)
    both = fk.fisher_topk_batched(params, [grads_a, grads_b], [7, 0.5], backend=backend)
    assert both.task(0) == single_a and both.task(1) == single_b
    fisher = [(g**2).sum(0) for g in grads_a]
    assert [m.tolist() for m in single_a.to_bool()] == [m.tolist() for m in topk_oracle(fisher, 7)]


def test_rejects_and_names_task():
    params = [torch.zeros(3), torch.zeros(2)]
    good = [torch.ones(3), torch.ones(2)]
    raises_naming(ValueError, "grads[1]", lambda: fk.fisher_topk_batched(params, [good, [torch.ones(3)]], 1))
    raises_naming(ValueError, "k", lambda: fk.fisher_topk(params, good, 6))
    raises_naming(TypeError, "params[0]", lambda: fk.fisher_topk([torch.zeros(3, dtype=torch.long)], [good[0]], 1))
    raises_naming(TypeError, "grads", lambda: fk.fisher_topk_batched(params, [], 1))


# ---------------------------------------------------------------------------------------------
# Triton: the top-K's classifying pass inside the Fisher accumulation (sampled path, interpreter)
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def fused(triton, monkeypatch):
    """The Triton backend with the top-K's sampled path (and so the fused pass) from 64 entries."""
    from fsmtl_kernels.triton import topk_mask as tk

    monkeypatch.setattr(tk, "MIN_SAMPLED", 64)
    monkeypatch.setattr(tk, "SAMPLE", 64)
    monkeypatch.setattr(tk, "CAP_PAD", 16)
    return triton


def integer_grads(shapes, n, dtype, seed):
    """Small integer gradients: their squares sum exactly in float32 in any order, so every backend
    has the same Fisher bits (and many ties)."""
    gen = torch.Generator().manual_seed(seed)
    lead = (n,) if n is not None else ()
    return [torch.randint(-3, 4, (*lead, *s), generator=gen).to(dtype) for s in shapes]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_fused_equals_reference(fused, dtype):
    shapes = [(13, 7), (0,), (5,), (33,)]
    params = [torch.zeros(s) for s in shapes]
    # Per-sample, batch and zero-sample gradients, one task each.
    grads = [integer_grads(shapes, n, dtype, seed) for seed, n in enumerate((4, None, 0))]
    total = sum(p.numel() for p in params)
    for k in ([0, total, 1], [60, 0.5, 17], [total - 1, 0.9, 2]):
        got = fk.fisher_topk_batched(params, grads, k, backend=fused)
        want = fk.fisher_topk_batched(params, grads, k, backend="reference")
        assert torch.equal(got.words, want.words), f"k={k}"


def test_fused_equals_accumulate_then_select(fused):
    """Random gradients: the fused pass writes the same Fisher bits as the accumulation kernel."""
    torch.manual_seed(4)
    params = [torch.zeros(40, 3), torch.zeros(31)]
    grads = [[torch.randn(5, *p.shape) for p in params], [torch.randn(*p.shape) for p in params]]
    fishers = [torch.zeros(2, *p.shape) for p in params]
    for t in range(2):
        fk.fisher_accumulate([f[t] for f in fishers], grads[t], backend=fused)
    for k in (1, 75, 150):
        got = fk.fisher_topk_batched(params, grads, k, backend=fused)
        assert torch.equal(got.words, fk.topk_mask_batched(fishers, k, backend="reference").words)


def test_fused_rejects_before_writing_and_names_nan(fused):
    params = [torch.zeros(50), torch.zeros(30)]
    good = [torch.ones(50), torch.ones(30)]
    short = [good, [torch.ones(50)]]
    raises_naming(ValueError, "grads[1]", lambda: fk.fisher_topk_batched(params, short, 1, backend=fused))
    bad = [torch.ones(2, 50), torch.ones(2, 30)]
    bad[1][1, 7] = float("nan")
    raises_naming(ValueError, "scores[1]", lambda: fk.fisher_topk(params, bad, 3, backend=fused))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (no GPU here)")
def test_gpu_fused_equals_reference():
    """P = 2e6 (the sampled path, so the fused pass), per-sample fp32 and batch bf16 gradients."""
    device = torch.device("cuda", torch.cuda.current_device())
    shapes = [(1000, 1000), (7,), (999_993,)]
    params = [torch.zeros(s, device=device) for s in shapes]
    grads = [
        [g.to(device) for g in integer_grads(shapes, 3, torch.float32, 5)],
        [g.to(device) for g in integer_grads(shapes, None, torch.bfloat16, 6)],
    ]
    for k in ([1, 0.5], [0.1, 0.9]):
        got = fk.fisher_topk_batched(params, grads, k, backend="triton")
        want = fk.fisher_topk_batched(params, grads, k, backend="reference")
        assert torch.equal(got.words, want.words), f"k={k}"
