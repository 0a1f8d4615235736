"""Triton backend on a CUDA GPU: the interpreter cases on device, large P, torch.compile, opcheck.

Skipped with a reason where no CUDA device exists (``tests/test_triton_backend.py`` runs the same
kernels under the Triton interpreter there). Run on a GPU machine with
``python -m pytest tests/test_triton_gpu.py -q``; the P = 1e8 cases need about 4 GB of GPU memory.
"""

from __future__ import annotations

import pytest
import torch
from test_triton_backend import (
    GRAD_DTYPES,
    ODD_SHAPES,
    assert_same_mask,
    assert_within_torch_error,
    random_mask,
    random_scores,
    tied_scores,
    total_entries,
)

import fsmtl_kernels as fk

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (no GPU here)"),
]

LARGE_P = 100_000_000


@pytest.fixture
def cuda():
    triton_backend = pytest.importorskip("fsmtl_kernels.triton", reason="triton is not installed")
    device = torch.device("cuda", torch.cuda.current_device())
    reason = triton_backend.unavailable_reason(device)
    if reason is not None:
        pytest.skip(reason)
    return device


@pytest.fixture(params=["default", "small"], ids=["default_blocks", "small_blocks"])
def gpu_blocks(request, monkeypatch):
    from fsmtl_kernels.triton import _utils

    if request.param == "small":
        for op, size in {"fisher": 64, "average": 64, "topk": 64, "linear": (16, 16, 16)}.items():
            monkeypatch.setitem(_utils.GPU_BLOCKS, op, size)
    return request.param


def test_auto_picks_triton_for_cuda(cuda):
    scores = random_scores(ODD_SHAPES, 2, cuda)
    auto = fk.topk_mask_batched(scores, 100)
    assert torch.equal(auto.words, fk.topk_mask_batched(scores, 100, backend="triton").words)
    assert "triton" in fk.available_backends(cuda)


@pytest.mark.parametrize("num_tasks", [1, 3, 8])
def test_topk_edge_counts(cuda, num_tasks, gpu_blocks):
    total = total_entries(ODD_SHAPES)
    scores = tied_scores(ODD_SHAPES, num_tasks, cuda, seed=num_tasks)
    ks = [0, 1, total - 1, total, total // 2, 17, 1000, 4096][:num_tasks] if num_tasks > 1 else [total // 3]
    assert_same_mask(scores, ks)


def test_topk_ties_zeros_infinities(cuda, gpu_blocks):
    total = total_entries(ODD_SHAPES)
    equal = [torch.full((2, *s), 0.5, device=cuda) for s in ODD_SHAPES]
    zeros = [torch.where(torch.rand(1, *s, device=cuda) < 0.5, -0.0, 0.0) for s in ODD_SHAPES]
    for k in (0, 1, 5, 1030, total - 1, total):
        assert_same_mask(equal, k)
        assert_same_mask(zeros, k)
    assert_same_mask(tied_scores(ODD_SHAPES, 3, cuda, seed=5), [1, 2000, total])


@pytest.mark.parametrize("dtype", GRAD_DTYPES)
def test_topk_low_precision(cuda, dtype):
    assert_same_mask([s.to(dtype) for s in random_scores(ODD_SHAPES, 3, cuda)], [0.1, 0.5, 0.9])


@pytest.mark.parametrize("ratio", [0.1, 0.5, 0.9])
def test_topk_large_p(cuda, ratio):
    """P = 1e8 split over uneven parameters, values on a coarse grid (many ties at the threshold)."""
    sizes = [1, 7, 1023, 4097, LARGE_P - 1 - 7 - 1023 - 4097]
    gen = torch.Generator(device=cuda).manual_seed(0)
    scores = [torch.randint(0, 4096, (1, n), device=cuda, generator=gen).float() / 64 for n in sizes]
    assert_same_mask(scores, ratio)


@pytest.mark.parametrize("dtype", GRAD_DTYPES)
@pytest.mark.parametrize("per_sample", [True, False], ids=["per_sample", "batch"])
def test_fisher_accumulate(cuda, dtype, per_sample, gpu_blocks):
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


def test_fisher_accumulate_large_p(cuda):
    grads = [torch.randn(LARGE_P, device=cuda, dtype=torch.float16)]
    ours, ref = [torch.zeros(LARGE_P, device=cuda)], [torch.zeros(LARGE_P, device=cuda)]
    fk.fisher_accumulate(ours, grads, backend="triton")
    fk.fisher_accumulate(ref, grads, backend="reference")
    assert torch.equal(ours[0], ref[0])


@pytest.mark.parametrize("num_tasks", [1, 3, 8])
@pytest.mark.parametrize("normalize", ["tasks", "selected"])
@pytest.mark.parametrize("dtype", GRAD_DTYPES)
def test_masked_average(cuda, num_tasks, normalize, dtype, gpu_blocks):
    grads = [torch.randn(num_tasks, *s, device=cuda).to(dtype) for s in ODD_SHAPES]
    mask = random_mask(ODD_SHAPES, num_tasks, cuda, seed=num_tasks)
    ours = fk.masked_grad_average(grads, mask, normalize=normalize, backend="triton")
    ref = fk.masked_grad_average(grads, mask, normalize=normalize, backend="reference")
    for o, r, g, m in zip(ours, ref, grads, mask.to_bool_stacked(), strict=True):
        total = (g.double() * m).sum(0)
        exact = total / num_tasks if normalize == "tasks" else total / m.sum(0).clamp_min(1)
        assert_within_torch_error(o, r, exact.cpu(), "average")


def test_masked_average_large_p(cuda):
    grads = [torch.randn(3, LARGE_P // 4, device=cuda), torch.randn(3, 7, device=cuda)]
    mask = fk.PackedMask.from_bool_stacked([torch.rand(g.shape, device=cuda) < 0.3 for g in grads])
    params = [torch.zeros(g.shape[1:], device=cuda, dtype=torch.float64) for g in grads]
    fk.masked_grad_average(grads, mask, normalize="selected", params=params, backend="triton")
    ref = fk.masked_grad_average(grads, mask, normalize="selected", backend="reference")
    for p, r in zip(params, ref, strict=True):
        torch.testing.assert_close(p.grad, r.double())


@pytest.mark.parametrize("sizes", [(1, 1, 1), (7, 33, 17), (1000, 257, 129)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", GRAD_DTYPES)
def test_linear_fisher(cuda, sizes, dtype):
    n, n_out, n_in = sizes
    g, a = torch.randn(n, n_out, device=cuda).to(dtype), torch.randn(n, n_in, device=cuda).to(dtype)
    ours_w, ours_b = torch.zeros(n_out, n_in, device=cuda), torch.zeros(n_out, device=cuda)
    ref_w, ref_b = ours_w.clone(), ours_b.clone()
    fk.linear_fisher(g, a, ours_w, ours_b, backend="triton")
    fk.linear_fisher(g, a, ref_w, ref_b, backend="reference")
    g2, a2 = g.double().square(), a.double().square()
    assert_within_torch_error(ours_w, ref_w, (g2.t() @ a2).cpu(), "weight fisher")
    assert_within_torch_error(ours_b, ref_b, g2.sum(0).cpu(), "bias fisher")


def test_opcheck_all_ops(cuda):
    shapes = [(7,), (3, 5)]
    grads = [torch.randn(4, *s, device=cuda) for s in shapes]
    ops = torch.ops.fsmtl_triton
    torch.library.opcheck(
        ops.fisher_accumulate.default, ([torch.zeros(s, device=cuda) for s in shapes], grads, 0.5, True)
    )
    scores = random_scores(shapes, 2, cuda)
    torch.library.opcheck(ops.topk_mask.default, (scores, [3, 22]))
    words = fk.topk_mask_batched(scores, [3, 22], backend="reference").words
    out = [torch.empty(s, device=cuda) for s in shapes]
    torch.library.opcheck(ops.masked_grad_average.default, ([g[:2].contiguous() for g in grads], words, "tasks", out))
    g, a = torch.randn(6, 5, device=cuda), torch.randn(6, 3, device=cuda)
    for bias in (torch.zeros(5, device=cuda), None):
        torch.library.opcheck(ops.linear_fisher.default, (g, a, torch.zeros(5, 3, device=cuda), bias, 0.5))


def test_torch_compile_fullgraph(cuda):
    """The registered ops (not the validating public functions, which read tensor values) compile
    into one graph with fullgraph=True and give the eager results."""
    ops = torch.ops.fsmtl_triton
    shapes = [(7,), (31, 33), (4097,)]

    def step(per_sample_grads, task_grads, g_out, inputs, weight_fisher, bias_fisher):
        fisher = [torch.zeros(g.shape[1:], device=g.device) for g in per_sample_grads]
        ops.fisher_accumulate(fisher, per_sample_grads, 1.0 / per_sample_grads[0].shape[0], True)
        words = ops.topk_mask([f.unsqueeze(0).expand(3, *f.shape).contiguous() for f in fisher], [5, 500, 4000])
        out = [torch.empty(g.shape[1:], device=g.device) for g in task_grads]
        ops.masked_grad_average(task_grads, words, "selected", out)
        ops.linear_fisher(g_out, inputs, weight_fisher, bias_fisher, 1.0)
        return words, out

    args = (
        [torch.randn(4, *s, device=cuda) for s in shapes],
        [torch.randn(3, *s, device=cuda) for s in shapes],
        torch.randn(9, 16, device=cuda),
        torch.randn(9, 24, device=cuda),
    )
    eager_w, eager_b = torch.zeros(16, 24, device=cuda), torch.zeros(16, device=cuda)
    comp_w, comp_b = eager_w.clone(), eager_b.clone()
    eager = step(*args, eager_w, eager_b)
    compiled = torch.compile(step, fullgraph=True)(*args, comp_w, comp_b)
    assert torch.equal(eager[0], compiled[0])
    for e, c in zip(eager[1], compiled[1], strict=True):
        torch.testing.assert_close(e, c)
    torch.testing.assert_close(eager_w, comp_w)
    torch.testing.assert_close(eager_b, comp_b)
