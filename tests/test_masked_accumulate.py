"""masked_accumulate on every backend: bit-exact against the reference (every dtype pair, odd
shapes, strides), the streamed sum against the float64 masked-average oracle, bad input, the op."""

from __future__ import annotations

import pytest
import torch
from cases import assert_unchanged, raises_naming, snapshot
from oracle import masked_average_oracle

import fsmtl_kernels as fk
from fsmtl_kernels import PackedMask

SHAPES = [(1,), (7,), (33,), (4, 9), (0,), (123,), (1023,), (5, 7, 3)]
ACC_DTYPES = [torch.float32, torch.float64]
GRAD_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def make_case(num_tasks=3, seed=0, shapes=SHAPES):
    gen = torch.Generator().manual_seed(seed)
    bools = [torch.rand(num_tasks, *s, generator=gen) < 0.4 for s in shapes]
    grads = [torch.randn(num_tasks, *s, generator=gen) for s in shapes]
    return PackedMask.from_bool_stacked(bools), bools, grads


@pytest.mark.parametrize("acc_dtype", ACC_DTYPES)
@pytest.mark.parametrize("grad_dtype", GRAD_DTYPES)
def test_bit_exact_with_reference(backend, acc_dtype, grad_dtype):
    mask, _, grads = make_case()
    start = [torch.randn(s, generator=torch.Generator().manual_seed(5)).to(acc_dtype) for s in SHAPES]
    ours = [a.clone() for a in start]
    ref = [a.clone() for a in start]
    for t in range(mask.num_tasks):
        rows = [g[t].to(grad_dtype) for g in grads]
        out = fk.masked_accumulate(ours, rows, mask, t, backend=backend)
        fk.masked_accumulate(ref, rows, mask, t, backend="reference")
        assert all(o is a for o, a in zip(out, ours))
    for o, r in zip(ours, ref, strict=True):
        assert o.dtype == acc_dtype
        assert torch.equal(o, r)


@pytest.mark.parametrize("normalize", fk.NORMALIZE_MODES)
def test_streamed_sum_is_the_masked_average(backend, normalize):
    """Streaming the T tasks, then dividing, is Eq. 4's masked average (float64 oracle)."""
    mask, bools, grads = make_case(num_tasks=4, seed=2)
    acc = [torch.zeros(s, dtype=torch.float64) for s in SHAPES]
    count = [torch.zeros(s, dtype=torch.float64) for s in SHAPES]
    for t in range(4):
        fk.masked_accumulate(acc, [g[t].double() for g in grads], mask, t, backend=backend)
        fk.masked_accumulate(count, [torch.ones(s, dtype=torch.float64) for s in SHAPES], mask, t, backend=backend)
    for a, c, ref in zip(acc, count, masked_average_oracle(grads, bools, normalize), strict=True):
        got = a / 4 if normalize == "tasks" else torch.where(c > 0, a / c.clamp_min(1), torch.zeros_like(a))
        torch.testing.assert_close(got, ref, atol=1e-12, rtol=1e-12)


def test_each_task_reads_its_own_row(backend):
    bools = [torch.tensor([[True, False, True], [False, True, False]])]
    mask = PackedMask.from_bool_stacked(bools)
    for t, expected in enumerate([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]):
        acc = [torch.zeros(3)]
        fk.masked_accumulate(acc, [torch.ones(3)], mask, t, backend=backend)
        assert acc[0].tolist() == expected


@pytest.mark.filterwarnings("ignore:invalid value encountered in multiply:RuntimeWarning")
def test_inf_outside_the_mask_gives_nan_like_reference(backend):
    mask = PackedMask.from_bool_stacked([torch.tensor([[True, False, True]])])
    grads = [torch.tensor([1.0, float("inf"), float("-inf")])]
    ours, ref = [torch.zeros(3)], [torch.zeros(3)]
    fk.masked_accumulate(ours, grads, mask, 0, backend=backend)
    fk.masked_accumulate(ref, grads, mask, 0, backend="reference")
    assert ours[0][1].isnan() and ours[0][2] == float("-inf")
    torch.testing.assert_close(ours[0], ref[0], equal_nan=True)


def test_strided_acc_and_grads(backend):
    mask, _, grads = make_case(num_tasks=2, seed=3, shapes=[(9, 7), (40,)])
    base = [torch.randn(7, 9).t(), torch.randn(80)[::2]]  # non-contiguous running sums
    ref = [b.clone() for b in base]
    rows = [grads[0][1].t().contiguous().t(), grads[1][1]]
    fk.masked_accumulate(base, rows, mask, 1, backend=backend)
    fk.masked_accumulate(ref, rows, mask, 1, backend="reference")
    for b, r in zip(base, ref, strict=True):
        assert not b.is_contiguous()
        assert torch.equal(b, r)


def test_many_parameters_cross_blocks(backend, blocks):
    shapes = [(4097,), (31,), (2, 2049)]
    mask, _, grads = make_case(num_tasks=2, seed=4, shapes=shapes)
    ours = [torch.zeros(s) for s in shapes]
    ref = [torch.zeros(s) for s in shapes]
    fk.masked_accumulate(ours, [g[1] for g in grads], mask, 1, backend=backend)
    fk.masked_accumulate(ref, [g[1] for g in grads], mask, 1, backend="reference")
    for o, r in zip(ours, ref, strict=True):
        assert torch.equal(o, r)


def make_inputs():
    mask = PackedMask.from_bool_stacked([torch.rand(2, 3) < 0.5, torch.rand(2, 4) < 0.5])
    acc = [torch.full((3,), 7.0), torch.full((4,), 7.0)]
    grads = [torch.randn(3), torch.randn(4)]
    return acc, grads, mask


BAD = [
    ("acc", TypeError, "acc", lambda a, g, m: fk.masked_accumulate([x.half() for x in a], g, m, 0)),
    ("grads-int", TypeError, "grads", lambda a, g, m: fk.masked_accumulate(a, [x.int() for x in g], m, 0)),
    ("grads-shape", ValueError, "grads[1]", lambda a, g, m: fk.masked_accumulate(a, [g[0], g[1][:3]], m, 0)),
    ("acc-shape", ValueError, "acc[0]", lambda a, g, m: fk.masked_accumulate([a[0][:2], a[1]], [g[0][:2], g[1]], m, 0)),
    ("length", ValueError, "grads", lambda a, g, m: fk.masked_accumulate(a, g[:1], m, 0)),
    ("mask", TypeError, "mask", lambda a, g, m: fk.masked_accumulate(a, g, m.to_bool(0), 0)),
    ("task-range", ValueError, "task", lambda a, g, m: fk.masked_accumulate(a, g, m, 2)),
    ("task-negative", ValueError, "task", lambda a, g, m: fk.masked_accumulate(a, g, m, -1)),
    ("task-bool", TypeError, "task", lambda a, g, m: fk.masked_accumulate(a, g, m, True)),
    ("backend", ValueError, "backend", lambda a, g, m: fk.masked_accumulate(a, g, m, 0, backend="fast")),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_names_the_argument_and_modifies_nothing(case):
    _, exc, name, call = case
    acc, grads, mask = make_inputs()
    before = snapshot(acc)
    raises_naming(exc, name, lambda: call(acc, grads, mask))
    assert_unchanged(before, acc)


def test_opcheck(cpp):
    mask, _, grads = make_case(num_tasks=2, seed=6, shapes=[(7,), (33,)])
    acc = [torch.zeros(7), torch.zeros(33)]
    torch.library.opcheck(
        torch.ops.fsmtl.masked_accumulate.default, (acc, [g[0] for g in grads], mask.words, mask.word_offsets, 1)
    )


# ---------------------------------------------------------------------------------------------
# masked_accumulate_tasks: a chunk of k tasks in one call, the bits of k single-task calls
# ---------------------------------------------------------------------------------------------


def assert_tasks_equal_single_calls(device, backend, acc_dtype, grad_dtype, shapes=SHAPES, first=1, k=3):
    mask, _, grads = make_case(num_tasks=first + k + 1, seed=9, shapes=shapes)
    mask = mask.to(device)
    start = [torch.randn(s, generator=torch.Generator().manual_seed(10)).to(acc_dtype).to(device) for s in shapes]
    chunk = [g[first : first + k].to(grad_dtype).to(device) for g in grads]
    ours, ref = [a.clone() for a in start], [a.clone() for a in start]
    fk.unchecked_kernel("masked_accumulate_tasks", device, backend)(ours, chunk, mask.words, mask.word_offsets, first)
    for j in range(k):
        fk.masked_accumulate(ref, [c[j] for c in chunk], mask, first + j, backend="reference")
    for o, r in zip(ours, ref, strict=True):
        assert torch.equal(o, r)


@pytest.mark.parametrize(("acc_dtype", "grad_dtype"), [(torch.float32, torch.bfloat16), (torch.float64, torch.float32)])
def test_tasks_equal_one_call_per_task(backend, acc_dtype, grad_dtype):
    assert_tasks_equal_single_calls("cpu", backend, acc_dtype, grad_dtype)


def test_tasks_cross_blocks_and_take_no_task(triton, blocks):
    assert_tasks_equal_single_calls("cpu", triton, torch.float32, torch.float32, shapes=[(300,), (7,), (65,)], k=2)
    acc = [torch.ones(5)]
    run = fk.unchecked_kernel("masked_accumulate_tasks", "cpu", triton)
    run(acc, [torch.ones(0, 5)], torch.ones(1, 1, dtype=torch.int32), [0], 0)
    assert acc[0].tolist() == [1.0] * 5


def test_tasks_opcheck(cpp):
    mask, _, grads = make_case(num_tasks=3, seed=6, shapes=[(7,), (33,)])
    acc = [torch.zeros(7), torch.zeros(33)]
    args = (acc, [g[1:] for g in grads], mask.words, mask.word_offsets, 1)
    torch.library.opcheck(torch.ops.fsmtl.masked_accumulate_tasks.default, args)


# ---------------------------------------------------------------------------------------------
# Triton on a CUDA GPU
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (no GPU here)")
@pytest.mark.parametrize("acc_dtype", ACC_DTYPES)
@pytest.mark.parametrize("grad_dtype", GRAD_DTYPES)
def test_gpu_bit_exact_with_reference(cuda, acc_dtype, grad_dtype, blocks):
    shapes = [*SHAPES, (4097,), (3, 2049)]
    mask, _, grads = make_case(num_tasks=3, seed=7, shapes=shapes)
    mask = mask.to(cuda)
    start = [torch.randn(s, generator=torch.Generator().manual_seed(8)).to(acc_dtype).to(cuda) for s in shapes]
    ours = [a.clone() for a in start]
    ref = [a.clone() for a in start]
    for t in range(mask.num_tasks):
        rows = [g[t].to(grad_dtype).to(cuda) for g in grads]
        fk.masked_accumulate(ours, rows, mask, t, backend="triton")
        fk.masked_accumulate(ref, rows, mask, t, backend="reference")
    for o, r in zip(ours, ref, strict=True):
        assert torch.equal(o, r)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (no GPU here)")
def test_gpu_large_p(cuda):
    n = 100_000_000 // 4
    bools = [torch.rand(2, n, device=cuda) < 0.3, torch.rand(2, 7, device=cuda) < 0.3]
    mask = PackedMask.from_bool_stacked(bools)
    grads = [torch.randn(n, device=cuda), torch.randn(7, device=cuda)]
    ours = [torch.zeros(n, device=cuda), torch.zeros(7, device=cuda)]
    ref = [torch.zeros(n, device=cuda), torch.zeros(7, device=cuda)]
    fk.masked_accumulate(ours, grads, mask, 1, backend="triton")
    fk.masked_accumulate(ref, grads, mask, 1, backend="reference")
    for o, r in zip(ours, ref, strict=True):
        assert torch.equal(o, r)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (no GPU here)")
def test_gpu_opcheck(cuda):
    mask, _, grads = make_case(num_tasks=2, seed=6, shapes=[(7,), (33,)])
    mask = mask.to(cuda)
    acc = [torch.zeros(7, device=cuda), torch.zeros(33, device=cuda)]
    rows = [g[0].to(cuda) for g in grads]
    torch.library.opcheck(torch.ops.fsmtl.masked_accumulate.default, (acc, rows, mask.words, mask.word_offsets, 1))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (no GPU here)")
@pytest.mark.parametrize(("acc_dtype", "grad_dtype"), [(torch.float32, torch.bfloat16), (torch.float32, torch.float32)])
def test_gpu_tasks_equal_one_call_per_task(cuda, acc_dtype, grad_dtype, blocks):
    shapes = [*SHAPES, (4097,), (3, 2049)]
    assert_tasks_equal_single_calls(cuda, "triton", acc_dtype, grad_dtype, shapes=shapes, k=4)
