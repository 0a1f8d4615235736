"""masked_grad_average on every backend: semantics against a float64 loop, bad input, the C++ and
Triton kernels (dtypes, ``.grad`` writing, strides, alignment groups), the registered op."""

from __future__ import annotations

import pytest
import torch
from cases import (
    CPU,
    GRAD_DTYPES,
    ODD_SHAPES,
    SHAPE_IDS,
    SHAPES,
    assert_unchanged,
    assert_within_torch_error,
    raises_naming,
    random_mask,
    random_scores,
    snapshot,
)
from oracle import masked_average_oracle

import fsmtl_kernels as fk
from fsmtl_kernels import PackedMask

LARGE_P = 100_000_000


# ---------------------------------------------------------------------------------------------
# Semantics, every backend
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("normalize", fk.NORMALIZE_MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_matches_loop(backend, normalize, dtype):
    torch.manual_seed(1)
    shapes = [(1,), (7,), (33,), (4, 9)]
    t = 3
    grads = [torch.randn(t, *s).to(dtype) for s in shapes]
    bools = [torch.rand(t, *s) < 0.5 for s in shapes]
    mask = fk.PackedMask.from_bool_stacked(bools)
    out = fk.masked_grad_average(grads, mask, normalize=normalize, backend=backend)
    for o, ref in zip(out, masked_average_oracle(grads, bools, normalize)):
        assert o.dtype == dtype
        tol = 1e-6 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(o.double(), ref, atol=tol, rtol=tol)


def test_selected_is_zero_where_no_task_selected(backend):
    grads = [torch.ones(2, 4)]
    mask = fk.PackedMask.from_bool_stacked([torch.tensor([[1, 0, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)])
    out = fk.masked_grad_average(grads, mask, normalize="selected", backend=backend)
    assert out[0].tolist() == [1.0, 0.0, 1.0, 0.0]
    out = fk.masked_grad_average(grads, mask, normalize="tasks", backend=backend)
    assert out[0].tolist() == [1.0, 0.0, 0.5, 0.0]


def test_writes_param_grad(backend):
    p = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    grads = [torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])]
    mask = fk.PackedMask.from_bool_stacked([torch.ones(2, 3, dtype=torch.bool)])
    out = fk.masked_grad_average(grads, mask, params=[p], backend=backend)
    assert out[0] is p.grad and p.grad.dtype == torch.float64
    assert p.grad.tolist() == [2.0, 2.0, 2.0]
    existing = p.grad
    fk.masked_grad_average(grads, mask, params=[p], backend=backend)
    assert p.grad is existing


# The Triton interpreter evaluates inf * 0 with numpy, which warns.
@pytest.mark.filterwarnings("ignore:invalid value encountered in multiply:RuntimeWarning")
def test_inf_gradient_like_reference(backend):
    """A masked-out entry contributes ``g * 0``, so an inf gradient gives NaN, as in the reference."""
    grads = [torch.tensor([[float("inf"), 1.0, 2.0], [3.0, float("-inf"), 4.0]])]
    mask = PackedMask.from_bool_stacked([torch.tensor([[True, False, True], [True, False, False]])])
    for normalize in fk.NORMALIZE_MODES:
        ours = fk.masked_grad_average(grads, mask, normalize=normalize, backend=backend)[0]
        ref = fk.masked_grad_average(grads, mask, normalize=normalize, backend="reference")[0]
        torch.testing.assert_close(ours, ref, equal_nan=True)


def test_mask_words_read_at_the_masks_offsets(backend):
    """Empty and 1-entry parameters between others: each parameter's bits at its own word offset."""
    shapes = [(0,), (33,), (1,), (0, 4), (40,)]
    bools = [torch.rand(2, *s) < 0.5 for s in shapes]
    grads = [torch.randn(2, *s) for s in shapes]
    mask = PackedMask.from_bool_stacked(bools)
    out = fk.masked_grad_average(grads, mask, normalize="selected", backend=backend)
    for o, ref in zip(out, masked_average_oracle(grads, bools, "selected"), strict=True):
        torch.testing.assert_close(o.double(), ref, atol=1e-6, rtol=1e-6)


def test_reference_reads_the_masks_cached_bool_tensors(monkeypatch):
    mask = random_mask([(7,), (33,)], 3, CPU)
    cached = mask.to_bool_stacked()
    monkeypatch.setattr("fsmtl_kernels.packed_mask.unpack_bits", None)  # any new unpacking would fail
    grads = [torch.randn(3, 7), torch.randn(3, 33)]
    for _ in range(2):
        out = fk.masked_grad_average(grads, mask, normalize="selected", backend="reference")
    for o, ref in zip(out, masked_average_oracle(grads, cached, "selected"), strict=True):
        torch.testing.assert_close(o.double(), ref, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Bad input: ValueError/TypeError naming the argument, nothing modified
# ---------------------------------------------------------------------------------------------


def make_average_inputs():
    grads = [torch.randn(2, 3), torch.randn(2, 4, 2)]
    mask = fk.PackedMask.from_bool_stacked([torch.rand(2, 3) < 0.5, torch.rand(2, 4, 2) < 0.5])
    params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(4, 2))]
    for p in params:
        p.grad = torch.full_like(p, 7.0)
    return grads, mask, params


AVERAGE_CASES = [
    ("normalize", ValueError, "normalize", lambda g, m, p: fk.masked_grad_average(g, m, normalize="mean", params=p)),
    ("mask type", TypeError, "mask", lambda g, m, p: fk.masked_grad_average(g, m.to_bool_stacked(), params=p)),
    ("grads count", ValueError, "grads", lambda g, m, p: fk.masked_grad_average(g[:1], m, params=p[:1])),
    ("grads shape", ValueError, "grads[1]", lambda g, m, p: fk.masked_grad_average([g[0], g[1][:1]], m, params=p)),
    ("integer grads", TypeError, "grads[0]", lambda g, m, p: fk.masked_grad_average([g[0].long(), g[1]], m, params=p)),
    ("params count", ValueError, "params", lambda g, m, p: fk.masked_grad_average(g, m, params=p[:1])),
    (
        "params shape",
        ValueError,
        "params[1]",
        lambda g, m, p: fk.masked_grad_average(g, m, params=[p[0], torch.nn.Parameter(torch.zeros(8))]),
    ),
    ("mask device", ValueError, "mask", lambda g, m, p: fk.masked_grad_average(g, m.to("meta"), params=p)),
]


@pytest.mark.parametrize(("case", "exc", "name", "call"), AVERAGE_CASES, ids=[c[0] for c in AVERAGE_CASES])
def test_rejects(case, exc, name, call):
    grads, mask, params = make_average_inputs()
    before_g, before_w = snapshot(grads), mask.words.clone()
    before_p = snapshot([p.grad for p in params])
    raises_naming(exc, name, lambda: call(grads, mask, params))
    assert_unchanged(before_g, grads)
    assert torch.equal(before_w, mask.words)
    assert_unchanged(before_p, [p.grad for p in params])


# ---------------------------------------------------------------------------------------------
# C++ kernel
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_tasks", [1, 3, 8])
@pytest.mark.parametrize("shapes", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("normalize", fk.NORMALIZE_MODES)
@pytest.mark.parametrize("dtype", GRAD_DTYPES)
def test_cpp_matches_float64(cpp, shapes, num_tasks, normalize, dtype):
    gen = torch.Generator().manual_seed(11)
    grads = [torch.randn(num_tasks, *s, generator=gen).to(dtype) for s in shapes]
    bools = [torch.rand(num_tasks, *s, generator=gen) < 0.5 for s in shapes]
    mask = PackedMask.from_bool_stacked(bools)
    ours = fk.masked_grad_average(grads, mask, normalize=normalize, backend=cpp)
    for o, g, b in zip(ours, grads, bools, strict=True):
        total = (g.double() * b).sum(0)
        if normalize == "tasks":
            expected = total / num_tasks
        else:
            count = b.sum(0)
            expected = torch.where(count > 0, total / count.clamp_min(1), torch.zeros_like(total))
        assert o.dtype == dtype
        if dtype == torch.float32:
            torch.testing.assert_close(o.double(), expected, rtol=2e-6, atol=1e-6)
        else:
            torch.testing.assert_close(o, expected.to(dtype))


@pytest.mark.parametrize("param_dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_cpp_into_param_grads(cpp, param_dtype):
    gen = torch.Generator().manual_seed(2)
    shapes = [(7, 3), (1023,)]
    params = [torch.zeros(s, dtype=param_dtype) for s in shapes]
    params[0].grad = torch.full((3, 7), 9.0, dtype=param_dtype).t()  # non-contiguous, overwritten
    grads = [torch.randn(3, *s, generator=gen) for s in shapes]
    mask = PackedMask.from_bool_stacked([torch.rand(3, *s, generator=gen) < 0.3 for s in shapes])
    ref = fk.masked_grad_average(grads, mask, normalize="selected", backend="reference")
    out = fk.masked_grad_average(grads, mask, normalize="selected", params=params, backend=cpp)
    for p, o, r in zip(params, out, ref, strict=True):
        assert o is p.grad and o.dtype == param_dtype
        torch.testing.assert_close(o, r.to(param_dtype))


def test_cpp_deterministic_across_threads(cpp):
    gen = torch.Generator().manual_seed(4)
    grads = [torch.randn(8, 50_000, generator=gen).half(), torch.randn(8, 123, generator=gen)]
    mask = PackedMask.from_bool_stacked([torch.rand(8, g.shape[1], generator=gen) < 0.5 for g in grads])
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            outs.append(fk.masked_grad_average(grads, mask, normalize="selected", backend=cpp))
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*outs, strict=True):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# Triton kernel (CPU interpreter)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_tasks", [1, 3, 8])
@pytest.mark.parametrize("normalize", fk.NORMALIZE_MODES)
def test_triton_tasks(triton, num_tasks, normalize, blocks):
    gen = torch.Generator().manual_seed(num_tasks)
    grads = [torch.randn(num_tasks, *s, generator=gen) for s in ODD_SHAPES]
    mask = random_mask(ODD_SHAPES, num_tasks, CPU, seed=num_tasks)
    ours = fk.masked_grad_average(grads, mask, normalize=normalize, backend=triton)
    ref = fk.masked_grad_average(grads, mask, normalize=normalize, backend="reference")
    exact = masked_average_oracle(grads, mask.to_bool_stacked(), normalize)
    for o, r, e in zip(ours, ref, exact, strict=True):
        torch.testing.assert_close(o, r)
        assert_within_torch_error(o, r, e, "average")


@pytest.mark.parametrize("dtype", GRAD_DTYPES)
@pytest.mark.parametrize("normalize", fk.NORMALIZE_MODES)
def test_triton_dtypes(triton, dtype, normalize):
    gen = torch.Generator().manual_seed(7)
    grads = [torch.randn(3, *s, generator=gen).to(dtype) for s in ODD_SHAPES]
    mask = fk.topk_mask_batched(random_scores(ODD_SHAPES, 3, CPU), [0.2, 0.5, 0.0001], backend=triton)
    ours = fk.masked_grad_average(grads, mask, normalize=normalize, backend=triton)
    ref = fk.masked_grad_average(grads, mask, normalize=normalize, backend="reference")
    exact = masked_average_oracle(grads, mask.to_bool_stacked(), normalize)
    for o, r, e in zip(ours, ref, exact, strict=True):
        assert o.dtype == dtype
        assert_within_torch_error(o, r, e, f"average {dtype}")


@pytest.mark.parametrize("param_dtype", [torch.float64, torch.float16, torch.float32])
def test_triton_into_param_grads(triton, param_dtype):
    """``.grad`` in the parameters' dtype (fp64 included), an existing non-contiguous ``.grad`` overwritten."""
    grads = [torch.randn(3, *s) for s in ODD_SHAPES]
    mask = random_mask(ODD_SHAPES, 3, CPU, seed=3)
    params = [torch.zeros(s, dtype=param_dtype) for s in ODD_SHAPES]
    params[2].grad = torch.full((33, 31), 7.0, dtype=param_dtype).t()
    grad_storage = params[2].grad.data_ptr()
    out = fk.masked_grad_average(grads, mask, normalize="selected", params=params, backend=triton)
    ref_params = [torch.zeros(s, dtype=param_dtype) for s in ODD_SHAPES]
    ref = fk.masked_grad_average(grads, mask, normalize="selected", params=ref_params, backend="reference")
    assert params[2].grad.data_ptr() == grad_storage
    for p, o, r in zip(params, out, ref, strict=True):
        assert o is p.grad and o.dtype == param_dtype
        torch.testing.assert_close(o, r)


def test_triton_mixed_grad_dtypes(triton):
    grads = [torch.randn(2, 7, dtype=torch.float16), torch.randn(2, 40), torch.randn(2, 3, dtype=torch.bfloat16)]
    mask = random_mask([(7,), (40,), (3,)], 2, CPU, p=0.7)
    ours = fk.masked_grad_average(grads, mask, backend=triton)
    ref = fk.masked_grad_average(grads, mask, backend="reference")
    for o, r in zip(ours, ref, strict=True):
        torch.testing.assert_close(o, r)


def test_triton_alignment_groups(triton, blocks):
    shapes = [(7,), (64,), (33,), (8, 16), (1,)]
    grads = [torch.randn(3, *s) for s in shapes]
    mask = random_mask(shapes, 3, CPU)
    for normalize in fk.NORMALIZE_MODES:
        ours = fk.masked_grad_average(grads, mask, normalize=normalize, backend=triton)
        ref = fk.masked_grad_average(grads, mask, normalize=normalize, backend="reference")
        for o, r in zip(ours, ref, strict=True):
            torch.testing.assert_close(o, r)


# ---------------------------------------------------------------------------------------------
# The registered op torch.ops.fsmtl.masked_grad_average
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("normalize", fk.NORMALIZE_MODES)
def test_opcheck(cpp, normalize):
    gen = torch.Generator().manual_seed(6)
    grads = [torch.randn(2, 5, 7, generator=gen), torch.randn(2, 40, generator=gen)]
    mask = random_mask([(5, 7), (40,)], 2, CPU)
    out = [torch.empty(5, 7), torch.empty(40)]
    args = (grads, mask.words, mask.word_offsets, normalize, out)
    torch.library.opcheck(torch.ops.fsmtl.masked_grad_average.default, args)


# ---------------------------------------------------------------------------------------------
# Triton on a CUDA GPU
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (no GPU here)")
@pytest.mark.parametrize("num_tasks", [1, 3, 8])
@pytest.mark.parametrize("normalize", fk.NORMALIZE_MODES)
@pytest.mark.parametrize("dtype", GRAD_DTYPES)
def test_gpu_matches_reference(cuda, num_tasks, normalize, dtype, blocks):
    grads = [torch.randn(num_tasks, *s, device=cuda).to(dtype) for s in ODD_SHAPES]
    mask = random_mask(ODD_SHAPES, num_tasks, cuda, seed=num_tasks)
    ours = fk.masked_grad_average(grads, mask, normalize=normalize, backend="triton")
    ref = fk.masked_grad_average(grads, mask, normalize=normalize, backend="reference")
    for o, r, g, m in zip(ours, ref, grads, mask.to_bool_stacked(), strict=True):
        total = (g.double() * m).sum(0)
        exact = total / num_tasks if normalize == "tasks" else total / m.sum(0).clamp_min(1)
        assert_within_torch_error(o, r, exact.cpu(), "average")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (no GPU here)")
def test_gpu_large_p(cuda):
    grads = [torch.randn(3, LARGE_P // 4, device=cuda), torch.randn(3, 7, device=cuda)]
    mask = fk.PackedMask.from_bool_stacked([torch.rand(g.shape, device=cuda) < 0.3 for g in grads])
    params = [torch.zeros(g.shape[1:], device=cuda, dtype=torch.float64) for g in grads]
    fk.masked_grad_average(grads, mask, normalize="selected", params=params, backend="triton")
    ref = fk.masked_grad_average(grads, mask, normalize="selected", backend="reference")
    for p, r in zip(params, ref, strict=True):
        torch.testing.assert_close(p.grad, r.double())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (no GPU here)")
def test_gpu_opcheck(cuda):
    shapes = [(7,), (3, 5)]
    grads = [torch.randn(2, *s, device=cuda) for s in shapes]
    mask = random_mask(shapes, 2, cuda)
    out = [torch.empty(s, device=cuda) for s in shapes]
    args = (grads, mask.words, mask.word_offsets, "tasks", out)
    torch.library.opcheck(torch.ops.fsmtl.masked_grad_average.default, args)
