"""masked_matmul_accumulate on every backend: against a float64 oracle (odd shapes, k = 1 and 3,
first_task > 0, a weight that is not the mask's first parameter, tile boundaries), entries outside
the mask untouched, bad input, the registered op."""

from __future__ import annotations

import pytest
import torch
from cases import assert_unchanged, assert_within_torch_error, raises_naming, snapshot

import fsmtl_kernels as fk
from fsmtl_kernels import PackedMask

NUM_TASKS = 5
PARAM = 1  # the weight is the mask's second parameter: its words start past the first's


def make_mask(out, n_in, seed=0, p=0.4, num_tasks=NUM_TASKS):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(13,), (out, n_in), (3,)]
    bools = [torch.rand(num_tasks, *s, generator=gen) < p for s in shapes]
    mask = PackedMask.from_bool_stacked(bools)
    assert mask.word_offsets[PARAM] > 0
    return mask, bools[PARAM]


def make_operands(k, out, n_in, n, dtype, seed=1):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(k, out, n, generator=gen).to(dtype)
    b = torch.randn(n, n_in, generator=gen).to(dtype)
    acc = torch.randn(out, n_in, generator=gen)
    return acc, a, b


def oracle(acc, a, b, bools, first_task):
    """float64: acc + sum_j S_{first_task + j} * (a[j] @ b)."""
    exact = acc.double().clone()
    for j in range(a.shape[0]):
        exact += bools[first_task + j].double() * (a[j].double() @ b.double())
    return exact


SHAPES = [(37, 45, 5), (130, 64, 64)]
CASES = [(1, 4), (3, 2), (3, 0)]  # (k, first_task)


@pytest.mark.parametrize("shape", SHAPES, ids=["37x45x5", "130x64x64"])
@pytest.mark.parametrize("k,first_task", CASES, ids=[f"k{k}_first{f}" for k, f in CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_matches_float64_oracle(backend, shape, k, first_task, dtype):
    out, n_in, n = shape
    mask, bools = make_mask(out, n_in)
    start, a, b = make_operands(k, out, n_in, n, dtype)
    acc = start.to(dtype)
    exact = oracle(acc, a, b, bools, first_task)
    got = fk.masked_matmul_accumulate(acc, a, b, mask, PARAM, first_task, backend=backend)
    assert got is acc and acc.dtype == dtype
    if dtype == torch.float64:
        torch.testing.assert_close(acc, exact, rtol=1e-12, atol=1e-12)
    else:
        ref = start.to(dtype)
        fk.masked_matmul_accumulate(ref, a, b, mask, PARAM, first_task, backend="reference")
        assert_within_torch_error(acc, ref, exact, f"{backend} {shape} k={k}")


def test_tiles_and_chunks_cross_blocks(backend, blocks):
    """Several tiles and n-chunks (small blocks: 3 x 3 tiles of 16, 3 chunks of 16)."""
    out, n_in, n = 37, 45, 40
    mask, bools = make_mask(out, n_in, seed=3)
    acc, a, b = make_operands(2, out, n_in, n, torch.float64, seed=4)
    acc = acc.double()
    exact = oracle(acc, a, b, bools, 1)
    fk.masked_matmul_accumulate(acc, a, b, mask, PARAM, 1, backend=backend)
    torch.testing.assert_close(acc, exact, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "acc_dtype,op_dtype", [(torch.float64, torch.float32), (torch.float32, torch.float64)], ids=["up", "down"]
)
def test_operands_converted_to_acc_dtype(backend, acc_dtype, op_dtype):
    out, n_in, n = 9, 33, 7
    mask, bools = make_mask(out, n_in, seed=5)
    start, a, b = make_operands(2, out, n_in, n, op_dtype, seed=6)
    acc = start.to(acc_dtype)
    ref = acc.clone()
    exact = oracle(acc, a.to(acc_dtype), b.to(acc_dtype), bools, 3)
    fk.masked_matmul_accumulate(acc, a, b, mask, PARAM, 3, backend=backend)
    fk.masked_matmul_accumulate(ref, a, b, mask, PARAM, 3, backend="reference")
    assert acc.dtype == acc_dtype
    if acc_dtype == torch.float64:
        torch.testing.assert_close(acc, exact, rtol=1e-12, atol=1e-12)
    else:
        assert_within_torch_error(acc, ref, exact, backend)


def test_entries_outside_the_tasks_masks_are_unchanged(backend):
    """Task 0 selects everything but is not read (first_task=1): entries outside tasks 1 and 2 keep their bits."""
    out, n_in, n = 19, 23, 6
    gen = torch.Generator().manual_seed(7)
    rows = torch.rand(3, out, n_in, generator=gen) < 0.3
    rows[0] = True
    mask = PackedMask.from_bool_stacked([torch.ones(3, 40, dtype=torch.bool), rows])
    acc, a, b = make_operands(2, out, n_in, n, torch.float32, seed=8)
    start = acc.clone()
    fk.masked_matmul_accumulate(acc, a, b, mask, 1, 1, backend=backend)
    outside = ~(rows[1] | rows[2])
    assert outside.any() and (~outside).any()
    assert torch.equal(acc[outside], start[outside])
    assert not torch.equal(acc[~outside], start[~outside])


def test_row_blocks_not_word_aligned(backend):
    """Wide rows: the C++ kernel's row blocks (15 rows of 2100 fp64 entries, about 256 KiB) start
    mid-word (15 * 2100 % 32 == 12)."""
    out, n_in, n = 37, 2100, 3
    mask, bools = make_mask(out, n_in, seed=14)
    acc, a, b = make_operands(2, out, n_in, n, torch.float64, seed=15)
    acc = acc.double()
    exact = oracle(acc, a, b, bools, 3)
    fk.masked_matmul_accumulate(acc, a, b, mask, PARAM, 3, backend=backend)
    torch.testing.assert_close(acc, exact, rtol=1e-12, atol=1e-12)


@pytest.mark.filterwarnings("ignore:invalid value encountered in multiply:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered in matmul:RuntimeWarning")
def test_inf_outside_the_mask_gives_nan_like_reference(backend):
    mask = PackedMask.from_bool_stacked([torch.tensor([[[True, False], [False, True]]])])
    a = torch.tensor([[[1.0], [float("inf")]]])  # [k=1, out=2, n=1]
    b = torch.tensor([[1.0, 2.0]])
    ours, ref = torch.zeros(2, 2), torch.zeros(2, 2)
    fk.masked_matmul_accumulate(ours, a, b, mask, 0, backend=backend)
    fk.masked_matmul_accumulate(ref, a, b, mask, 0, backend="reference")
    assert ours[1, 0].isnan() and ours[1, 1] == float("inf")
    torch.testing.assert_close(ours, ref, equal_nan=True)


def make_inputs():
    mask, _ = make_mask(4, 6, seed=9, num_tasks=3)
    acc = torch.full((4, 6), 7.0)
    a = torch.randn(2, 4, 5)
    b = torch.randn(5, 6)
    return acc, a, b, mask


def call(acc, a, b, mask, param_index=PARAM, first_task=0, **kw):
    return fk.masked_matmul_accumulate(acc, a, b, mask, param_index, first_task, **kw)


BAD = [
    ("acc-dtype", TypeError, "acc", lambda c, a, b, m: call(c.half(), a, b, m)),
    ("acc-type", TypeError, "acc", lambda c, a, b, m: call(c.tolist(), a, b, m)),
    ("a-dtype", TypeError, "a ", lambda c, a, b, m: call(c, a.half(), b, m)),
    ("b-dtype", TypeError, "b ", lambda c, a, b, m: call(c, a, b.double(), m)),
    ("acc-strided", ValueError, "acc", lambda c, a, b, m: call(c.t().contiguous().t(), a, b, m)),
    ("acc-dim", ValueError, "acc", lambda c, a, b, m: call(c.reshape(-1), a, b, m)),
    ("a-dim", ValueError, "a ", lambda c, a, b, m: call(c, a[0], b, m)),
    ("a-rows", ValueError, "a.shape[1]", lambda c, a, b, m: call(c, a[:, :3], b, m)),
    ("b-rows", ValueError, "b.shape[0]", lambda c, a, b, m: call(c, a, b[:4], m)),
    ("b-cols", ValueError, "b.shape[1]", lambda c, a, b, m: call(c, a, b[:, :5], m)),
    ("mask", TypeError, "mask", lambda c, a, b, m: call(c, a, b, m.to_bool(0))),
    ("param-shape", ValueError, "mask parameter 0", lambda c, a, b, m: call(c, a, b, m, 0)),
    ("param-range", ValueError, "param_index", lambda c, a, b, m: call(c, a, b, m, 3)),
    ("param-bool", TypeError, "param_index", lambda c, a, b, m: call(c, a, b, m, True)),
    ("first-range", ValueError, "first_task", lambda c, a, b, m: call(c, a, b, m, PARAM, 2)),
    ("first-negative", ValueError, "first_task", lambda c, a, b, m: call(c, a, b, m, PARAM, -1)),
    ("first-float", TypeError, "first_task", lambda c, a, b, m: call(c, a, b, m, PARAM, 1.0)),
    ("backend", ValueError, "backend", lambda c, a, b, m: call(c, a, b, m, backend="fast")),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_names_the_argument_and_modifies_nothing(case):
    _, exc, name, fn = case
    acc, a, b, mask = make_inputs()
    before = snapshot([acc])
    raises_naming(exc, name, lambda: fn(acc, a, b, mask))
    assert_unchanged(before, [acc])


def test_opcheck(cpp):
    mask, _ = make_mask(7, 9, seed=10)
    acc, a, b = make_operands(2, 7, 9, 4, torch.float32, seed=11)
    torch.library.opcheck(
        torch.ops.fsmtl.masked_matmul_accumulate.default, (acc, a, b, mask.words, mask.word_offsets[PARAM], 2)
    )


# ---------------------------------------------------------------------------------------------
# Triton on a CUDA GPU
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (no GPU here)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_gpu_matches_float64_oracle(cuda, dtype):
    out, n_in, n = 130, 200, 300
    mask, bools = make_mask(out, n_in, seed=12)
    start, a, b = make_operands(3, out, n_in, n, dtype, seed=13)
    exact = oracle(start, a, b, bools, 1)
    acc = start.to(dtype).to(cuda)
    fk.masked_matmul_accumulate(acc, a.to(cuda), b.to(cuda), mask.to(cuda), PARAM, 1, backend="triton")
    ref = start.to(dtype)
    fk.masked_matmul_accumulate(ref, a, b, mask, PARAM, 1, backend="reference")
    assert_within_torch_error(acc, ref, exact, "triton on GPU")


# ---------------------------------------------------------------------------------------------
# The masked step's CUDA paths: fused Linear weights, chunks of tasks by one launch per kernel
# ---------------------------------------------------------------------------------------------

STEP_TASKS = 3


def mlp_step(device, seed=0):
    """A float64 MLP of three Linear layers with STEP_TASKS heads, a mask, and its losses."""
    from torch import nn

    import fsmtl

    torch.manual_seed(seed)
    trunk = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 8))
    model = fsmtl.MultiTaskModel(trunk, [nn.Linear(8, 1) for _ in range(STEP_TASKS)]).double().to(device)
    mask = PackedMask.from_bool_stacked([torch.rand(STEP_TASKS, *p.shape) < 0.5 for p in model.masked_parameters()])
    x = torch.randn(10, 6, dtype=torch.float64, device=device)
    ys = [torch.randn(10, 1, dtype=torch.float64, device=device) for _ in range(STEP_TASKS)]

    def losses(record=None):
        features = model.features(x, record=record)
        return [((h(features) - y) ** 2).mean() for h, y in zip(model.heads, ys)]

    return model, mask.to(device), losses


def masked_reference(model, mask, losses) -> list[torch.Tensor]:
    """Eq. 4 for the masked parameters from one autograd.grad per task."""
    params = model.masked_parameters()
    out = [torch.zeros_like(p) for p in params]
    bools = mask.to_bool_stacked()
    for t, loss in enumerate(losses()):
        for o, g, b in zip(out, torch.autograd.grad(loss, params, retain_graph=True), bools):
            o.add_(g * b[t])
    return [o / STEP_TASKS for o in out]


def run_step(model, mask, losses, batched, backend="auto"):
    import fsmtl
    from fsmtl.gradients import ForwardRecord

    model.zero_grad(set_to_none=True)
    record = ForwardRecord()
    step_losses = losses(record)
    return fsmtl.masked_multitask_backward(
        step_losses,
        model.masked_parameters(),
        mask,
        dense_params=model.dense_shared_parameters(),
        head_params=model.head_parameters(),
        batched=batched,
        record=record,
        backend=backend,
    )


@pytest.mark.parametrize("chunk", [1, 2, STEP_TASKS])
def test_chunked_batched_step_with_fused_linears(triton, monkeypatch, chunk):
    """The batched mode as CUDA runs it (one batched backward per chunk stopped at the Linear
    outputs, one launch per kernel and chunk), here on CPU tensors with Triton interpreted."""
    import fsmtl.gradients.backward as backward

    monkeypatch.setattr(backward, "_chunked_launches", lambda device: True)
    monkeypatch.setattr(backward, "task_chunk", lambda numels, num_tasks: chunk)
    model, mask, losses = mlp_step("cpu")
    want = masked_reference(model, mask, losses)
    path = run_step(model, mask, losses, batched=True, backend=triton)
    assert path.batched and path.task_chunk == chunk and path.fused == (0, 2, 4)  # the three weights
    for p, w in zip(model.masked_parameters(), want, strict=True):
        torch.testing.assert_close(p.grad, w, rtol=1e-12, atol=1e-14)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (no GPU here)")
@pytest.mark.parametrize("batched", [False, True])
def test_gpu_step_fuses_linears_without_host_sync(cuda, batched):
    model, mask, losses = mlp_step(cuda)
    want = masked_reference(model, mask, losses)
    run_step(model, mask, losses, batched)  # first call: compiles and uploads the tables
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        path = run_step(model, mask, losses, batched)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert path.fused == (0, 2, 4) and path.batched == batched
    for p, w in zip(model.masked_parameters(), want, strict=True):
        torch.testing.assert_close(p.grad, w, rtol=1e-10, atol=1e-12)
