"""Triton backend against the reference, on CPU tensors under the Triton interpreter.

``tests/conftest.py`` sets ``TRITON_INTERPRET=1`` before the package is imported when CUDA is
absent. Shapes are small and blocks large (see ``fsmtl_kernels.triton._utils``) so the whole file
runs in well under a minute on two cores; the ``small_blocks`` cases shrink the blocks so that
parameters span many blocks and tie ranks cross block boundaries.

The case builders here are reused by ``test_triton_gpu.py`` on CUDA tensors.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oracle import fisher_oracle, masked_average_oracle, topk_oracle

import fsmtl_kernels as fk
from fsmtl_kernels import reference

triton_backend = pytest.importorskip("fsmtl_kernels.triton", reason="triton is not installed")
from fsmtl_kernels.triton import _utils  # noqa: E402

CPU = torch.device("cpu")
pytestmark = [
    pytest.mark.interpreter,
    pytest.mark.skipif(
        triton_backend.unavailable_reason(CPU) is not None,
        reason=f"Triton interpreter not active: {triton_backend.unavailable_reason(CPU)} "
        "(on a CUDA machine, tests/test_triton_gpu.py runs these cases on the GPU)",
    ),
]

#: Parameter shapes whose sizes are not multiples of a block or of 32 (1, 7, 1023, 4097 entries).
ODD_SHAPES = [(1,), (7,), (31, 33), (4097,)]
SMALL_BLOCKS = {"fisher": 64, "average": 64, "topk": 256, "linear": (16, 16, 16)}
GRAD_DTYPES = [torch.float16, torch.bfloat16, torch.float32]


@pytest.fixture(params=["default", "small"], ids=["default_blocks", "small_blocks"])
def blocks(request, monkeypatch):
    """Run a test with the mode's block sizes and again with small blocks (many per parameter)."""
    if request.param == "small":
        for op, size in SMALL_BLOCKS.items():
            monkeypatch.setitem(_utils.INTERPRETER_BLOCKS, op, size)
            monkeypatch.setitem(_utils.GPU_BLOCKS, op, size)
    return request.param


# ---------------------------------------------------------------------------------------------
# Case builders (shared with test_triton_gpu.py)
# ---------------------------------------------------------------------------------------------


def tied_scores(shapes, num_tasks: int, device, seed: int = 0, levels: int = 5) -> list[torch.Tensor]:
    """Scores ``[T, *shape]`` drawn from a few levels (many ties), with -0.0, +0.0, +inf and -inf mixed in."""
    gen = torch.Generator().manual_seed(seed)
    values = torch.tensor([-float("inf"), -1.5, -0.0, 0.0, 0.25, 1.0, 3.0, float("inf")])
    out = []
    for shape in shapes:
        idx = torch.randint(0, len(values), (num_tasks, *shape), generator=gen)
        out.append(values[idx].to(device))
    # Spread a few distinct values so the radix passes see more than one populated digit.
    out[-1].view(num_tasks, -1)[:, :levels] = torch.linspace(-2.0, 2.0, levels)
    return out


def random_scores(shapes, num_tasks: int, device, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(num_tasks, *shape, generator=gen).abs().to(device) for shape in shapes]


def total_entries(shapes) -> int:
    return sum(torch.Size(s).numel() for s in shapes)


def assert_same_mask(scores, ks, backend: str = "triton") -> fk.PackedMask:
    got = fk.topk_mask_batched(scores, ks, backend=backend)
    want = fk.topk_mask_batched(scores, ks, backend="reference")  # same device: P = 1e8 stays on the GPU
    assert torch.equal(got.words, want.words), "packed words differ from the reference"
    total = want.num_entries
    expected = [ks] * want.num_tasks if isinstance(ks, (int, float)) else ks
    assert got.count().cpu().tolist() == [k if isinstance(k, int) else fk.resolve_k(k, total) for k in expected]
    return got


def random_mask(shapes, num_tasks: int, device, p: float = 0.4, seed: int = 1) -> fk.PackedMask:
    gen = torch.Generator().manual_seed(seed)
    bools = [torch.rand(num_tasks, *shape, generator=gen) < p for shape in shapes]
    return fk.PackedMask.from_bool_stacked(bools).to(device)


def assert_within_torch_error(got: torch.Tensor, ref: torch.Tensor, exact: torch.Tensor, what: str) -> None:
    """flash-attention's rule: our error against float64 is at most twice the reference's (plus fp32 ulps)."""
    ours = (got.cpu().double() - exact).abs().max().item() if got.numel() else 0.0
    theirs = (ref.cpu().double() - exact).abs().max().item() if ref.numel() else 0.0
    slack = 4 * torch.finfo(torch.float32).eps * (exact.abs().max().item() if exact.numel() else 0.0)
    assert ours <= 2 * theirs + slack, f"{what}: error {ours:.3g} vs reference error {theirs:.3g}"


# ---------------------------------------------------------------------------------------------
# Availability
# ---------------------------------------------------------------------------------------------


def test_available_on_cpu_under_interpreter():
    assert _utils.is_interpreter()
    assert triton_backend.unavailable_reason(CPU) is None
    assert "triton" in fk.available_backends("cpu")
    assert "not on meta" in triton_backend.unavailable_reason(torch.device("meta"))


def test_clear_error_on_cpu_without_interpreter():
    """Without TRITON_INTERPRET, backend='triton' on CPU tensors raises BackendUnavailableError."""
    script = textwrap.dedent(
        """
        import os
        import torch
        import fsmtl_kernels as fk
        from fsmtl_kernels import triton as tb
        assert "triton" not in fk.available_backends("cpu")
        try:
            fk.topk_mask([torch.ones(3)], 1, backend="triton")
        except fk.BackendUnavailableError as exc:
            print("ERROR:", exc)
        else:
            raise SystemExit("no error raised")
        os.environ["TRITON_INTERPRET"] = "1"
        print("LATE:", tb.unavailable_reason(torch.device("cpu")))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    error = next(line for line in proc.stdout.splitlines() if line.startswith("ERROR:"))
    assert "backend='triton' is not available for cpu tensors" in error
    assert "set TRITON_INTERPRET=1 before importing fsmtl_kernels" in error
    late = next(line for line in proc.stdout.splitlines() if line.startswith("LATE:"))
    assert "was set after fsmtl_kernels.triton was imported" in late


def test_segment_table_reads_cpu_pointers():
    """The pointer-table design relies on the interpreter dereferencing CPU addresses in place."""
    a, b = torch.zeros(7), torch.zeros(40)
    fk.fisher_accumulate([a, b], [torch.full((7,), 2.0), torch.full((40,), 3.0)], backend="triton")
    assert torch.equal(a, torch.full((7,), 4.0)) and torch.equal(b, torch.full((40,), 9.0))


def test_find_segment_skips_empty_parameters(blocks):
    shapes = [(0,), (5,), (0,), (3, 0), (70,), (0,)]
    scores = random_scores(shapes, 2, CPU)
    assert_same_mask(scores, [3, 75])
    grads = [torch.randn(2, *s) for s in shapes]
    fisher = [torch.zeros(s) for s in shapes]
    fk.fisher_accumulate(fisher, [g[0] for g in grads], backend="triton")
    for f, g in zip(fisher, grads, strict=True):
        assert torch.equal(f, g[0].square())


# ---------------------------------------------------------------------------------------------
# Top-K mask: bit for bit
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_tasks", [1, 3, 8])
def test_topk_edge_counts(num_tasks, blocks):
    scores = tied_scores(ODD_SHAPES, num_tasks, CPU, seed=num_tasks)
    total = total_entries(ODD_SHAPES)
    ks = [0, 1, total - 1, total, total // 2, 17, 1000, 4096][:num_tasks] if num_tasks > 1 else [total // 3]
    assert_same_mask(scores, ks)


@pytest.mark.parametrize("k", [0, 1, "P-1", "P"])
def test_topk_k_extremes(k):
    total = total_entries(ODD_SHAPES)
    k = {"P-1": total - 1, "P": total}.get(k, k)
    assert_same_mask(tied_scores(ODD_SHAPES, 1, CPU, seed=3), k)


def test_topk_all_ties_position_order(blocks):
    """Every score equal: the first k positions (parameter order, then flat index) are taken."""
    scores = [torch.full((2, *s), 0.5) for s in ODD_SHAPES]
    total = total_entries(ODD_SHAPES)
    for k in (5, 1030, total - 2):
        mask = assert_same_mask(scores, k)
        flat = torch.cat([m[0].reshape(-1) for m in mask.to_bool_stacked()])
        assert flat[:k].all() and not flat[k:].any()


def test_topk_signed_zero_is_one_value(blocks):
    """-0.0 and +0.0 tie: taken in position order whatever the sign."""
    gen = torch.Generator().manual_seed(5)
    scores = [torch.where(torch.rand(1, *s, generator=gen) < 0.5, -0.0, 0.0) for s in ODD_SHAPES]
    scores[2][0, 3, 4] = 1.0
    for k in (1, 2, 600, 3000):
        assert_same_mask(scores, k)


def test_topk_infinities_and_extremes():
    tiny = torch.finfo(torch.float32).tiny
    values = torch.tensor(
        [float("inf"), 3.4e38, 1.0, tiny / 4, tiny, 0.0, -0.0, -tiny / 4, -1.0, -3.4e38, -float("inf")]
    )
    scores = [
        values[torch.randperm(len(values), generator=torch.Generator().manual_seed(s))].repeat(1, 3) for s in (1, 2)
    ]
    total = 2 * 3 * len(values)
    for k in range(0, total + 1, 5):
        assert_same_mask(scores, k)


def test_topk_matches_sort_oracle():
    scores = tied_scores(ODD_SHAPES[:3], 1, CPU, seed=9)
    for k in (0, 3, 500, 1031):
        got = fk.topk_mask([s[0] for s in scores], k, backend="triton")
        want = topk_oracle([s[0] for s in scores], k)
        for g, w in zip(got.to_bool(), want, strict=True):
            assert torch.equal(g, w)


@pytest.mark.parametrize("dtype", GRAD_DTYPES)
def test_topk_low_precision_scores(dtype):
    scores = [s.to(dtype) for s in random_scores(ODD_SHAPES, 3, CPU, seed=11)]
    assert_same_mask(scores, [0.1, 0.5, 0.9])


def test_topk_distinct_random_scores(blocks):
    scores = random_scores(ODD_SHAPES, 3, CPU, seed=4)
    total = total_entries(ODD_SHAPES)
    assert_same_mask(scores, [1, total // 2, total - 1])


def test_topk_alignment_groups_keep_position_order(blocks):
    """Parameters allowing vector loads (16-byte aligned, size a multiple of 8) launch apart from
    the others; ties must still be ranked in parameter order across both launches."""
    assert _utils.is_aligned((64,), 16) and not _utils.is_aligned((64,), 7) and not _utils.is_aligned((8,), 16)
    shapes = [(7,), (64,), (33,), (8, 16), (1,), (1024,)]
    scores = [torch.full((3, *s), 0.5) for s in shapes]
    scores[3][:, 2, 3] = 2.0
    offset_view = torch.full((3, 1 + 64), 0.5)[:, 1:]  # size 64, misaligned storage: unaligned group
    total = total_entries(shapes)
    assert_same_mask(scores, [1, 40, total - 3])
    assert_same_mask([*scores, offset_view.contiguous()], [0, 100, 700])


# ---------------------------------------------------------------------------------------------
# Fisher accumulation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", GRAD_DTYPES)
@pytest.mark.parametrize("per_sample", [True, False], ids=["per_sample", "batch"])
def test_fisher_accumulate(dtype, per_sample, blocks):
    gen = torch.Generator().manual_seed(2)
    n = 5
    grads = [
        (torch.randn((n, *s) if per_sample else s, generator=gen) * 300).to(dtype)  # fp16 squares overflow
        for s in ODD_SHAPES
    ]
    start = [torch.rand(s, generator=gen) for s in ODD_SHAPES]
    ours = [f.clone() for f in start]
    ref = [f.clone() for f in start]
    fk.fisher_accumulate(ours, grads, scale=0.25, backend="triton")
    reference.fisher_accumulate(ref, grads, 0.25, per_sample)
    exact = [f.double() + 0.25 * o for f, o in zip(start, fisher_oracle(grads, per_sample), strict=True)]
    for o, r, e in zip(ours, ref, exact, strict=True):
        assert torch.isfinite(o).all()
        torch.testing.assert_close(o, r, rtol=2e-6, atol=0)
        assert_within_torch_error(o, r, e, "fisher")


def test_fisher_and_average_alignment_groups(blocks):
    shapes = [(7,), (64,), (33,), (8, 16), (1,)]
    grads = [torch.randn(3, *s) for s in shapes]
    flat = torch.zeros(1 + 64)
    fisher = [torch.zeros(s) for s in shapes] + [flat[1:]]  # a misaligned view of a flat buffer
    fk.fisher_accumulate(fisher, [*grads, torch.randn(3, 64)], backend="triton")
    for f, g in zip(fisher[:-1], grads, strict=True):
        torch.testing.assert_close(f, g.square().sum(0))
    mask = random_mask(shapes, 3, CPU)
    for normalize in ("tasks", "selected"):
        ours = fk.masked_grad_average(grads, mask, normalize=normalize, backend="triton")
        ref = fk.masked_grad_average(grads, mask, normalize=normalize, backend="reference")
        for o, r in zip(ours, ref, strict=True):
            torch.testing.assert_close(o, r)


def test_fisher_accumulate_strided_and_mixed_dtypes():
    """Non-contiguous Fisher views and gradients, and two gradient dtypes (two launches)."""
    base = torch.zeros(33, 31)
    fisher = [base.t(), torch.zeros(7)]  # [31, 33] transposed view
    grads = [torch.randn(4, 33, 31).transpose(1, 2), torch.randn(4, 7, dtype=torch.float16)]
    fk.fisher_accumulate(fisher, grads, backend="triton")
    assert fisher[0].data_ptr() == base.data_ptr()
    torch.testing.assert_close(fisher[0], grads[0].square().sum(0))
    torch.testing.assert_close(fisher[1], grads[1].float().square().sum(0))


# ---------------------------------------------------------------------------------------------
# Masked average
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_tasks", [1, 3, 8])
@pytest.mark.parametrize("normalize", ["tasks", "selected"])
def test_masked_average_tasks(num_tasks, normalize, blocks):
    gen = torch.Generator().manual_seed(num_tasks)
    grads = [torch.randn(num_tasks, *s, generator=gen) for s in ODD_SHAPES]
    mask = random_mask(ODD_SHAPES, num_tasks, CPU, seed=num_tasks)
    ours = fk.masked_grad_average(grads, mask, normalize=normalize, backend="triton")
    ref = fk.masked_grad_average(grads, mask, normalize=normalize, backend="reference")
    exact = masked_average_oracle(grads, mask.to_bool_stacked(), normalize)
    for o, r, e in zip(ours, ref, exact, strict=True):
        torch.testing.assert_close(o, r)
        assert_within_torch_error(o, r, e, "average")


@pytest.mark.parametrize("dtype", GRAD_DTYPES)
@pytest.mark.parametrize("normalize", ["tasks", "selected"])
def test_masked_average_dtypes(dtype, normalize):
    gen = torch.Generator().manual_seed(7)
    grads = [torch.randn(3, *s, generator=gen).to(dtype) for s in ODD_SHAPES]
    mask = fk.topk_mask_batched(random_scores(ODD_SHAPES, 3, CPU), [0.2, 0.5, 0.0001], backend="triton")
    ours = fk.masked_grad_average(grads, mask, normalize=normalize, backend="triton")
    ref = fk.masked_grad_average(grads, mask, normalize=normalize, backend="reference")
    exact = masked_average_oracle(grads, mask.to_bool_stacked(), normalize)
    for o, r, e in zip(ours, ref, exact, strict=True):
        assert o.dtype == dtype
        assert_within_torch_error(o, r, e, f"average {dtype}")


@pytest.mark.parametrize("param_dtype", [torch.float64, torch.float16, torch.float32])
def test_masked_average_into_param_grads(param_dtype):
    """``.grad`` in the parameters' dtype (fp64 included), an existing non-contiguous ``.grad`` overwritten."""
    grads = [torch.randn(3, *s) for s in ODD_SHAPES]
    mask = random_mask(ODD_SHAPES, 3, CPU, seed=3)
    params = [torch.zeros(s, dtype=param_dtype) for s in ODD_SHAPES]
    params[2].grad = torch.full((33, 31), 7.0, dtype=param_dtype).t()
    grad_storage = params[2].grad.data_ptr()
    out = fk.masked_grad_average(grads, mask, normalize="selected", params=params, backend="triton")
    ref_params = [torch.zeros(s, dtype=param_dtype) for s in ODD_SHAPES]
    ref = fk.masked_grad_average(grads, mask, normalize="selected", params=ref_params, backend="reference")
    assert params[2].grad.data_ptr() == grad_storage
    for p, o, r in zip(params, out, ref, strict=True):
        assert o is p.grad and o.dtype == param_dtype
        torch.testing.assert_close(o, r)


def test_masked_average_mixed_grad_dtypes():
    grads = [torch.randn(2, 7, dtype=torch.float16), torch.randn(2, 40), torch.randn(2, 3, dtype=torch.bfloat16)]
    mask = random_mask([(7,), (40,), (3,)], 2, CPU, p=0.7)
    ours = fk.masked_grad_average(grads, mask, backend="triton")
    ref = fk.masked_grad_average(grads, mask, backend="reference")
    for o, r in zip(ours, ref, strict=True):
        torch.testing.assert_close(o, r)


# ---------------------------------------------------------------------------------------------
# Linear-layer Fisher
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sizes", [(1, 1, 1), (7, 33, 17), (130, 65, 129)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", GRAD_DTYPES)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
def test_linear_fisher(sizes, dtype, with_bias, blocks):
    n, n_out, n_in = sizes
    gen = torch.Generator().manual_seed(n)
    g = torch.randn(n, n_out, generator=gen).to(dtype)
    a = torch.randn(n, n_in, generator=gen).to(dtype)
    wf, bf = torch.rand(n_out, n_in, generator=gen), torch.rand(n_out, generator=gen)
    ours_w, ref_w = wf.clone(), wf.clone()
    ours_b, ref_b = (bf.clone(), bf.clone()) if with_bias else (None, None)
    fk.linear_fisher(g, a, ours_w, ours_b, scale=0.5, backend="triton")
    fk.linear_fisher(g, a, ref_w, ref_b, scale=0.5, backend="reference")
    g2, a2 = g.double().square(), a.double().square()
    assert_within_torch_error(ours_w, ref_w, wf.double() + 0.5 * g2.t() @ a2, "weight fisher")
    if with_bias:
        assert_within_torch_error(ours_b, ref_b, bf.double() + 0.5 * g2.sum(0), "bias fisher")


def test_linear_fisher_strided_operands():
    g = torch.randn(40, 9).t()  # [9, 40] with stride (1, 9): N=9 samples, out=40
    a = torch.randn(23, 9).t()  # [9, 23]
    wf_base = torch.zeros(23, 40)
    wf = wf_base.t()
    fk.linear_fisher(g, a, wf, None, backend="triton")
    torch.testing.assert_close(wf_base.t(), g.square().t() @ a.square())


def test_linear_fisher_matches_per_sample_gradients():
    """The identity itself: equals summing squared per-sample gradients from fisher_accumulate."""
    layer = torch.nn.Linear(11, 6)
    x = torch.randn(5, 11)
    g = torch.randn(5, 6)
    per_sample_w = g[:, :, None] * x[:, None, :]
    wf, bf = torch.zeros(6, 11), torch.zeros(6)
    fk.linear_fisher(g, x, wf, bf, backend="triton")
    fw, fb = torch.zeros_like(layer.weight), torch.zeros_like(layer.bias)
    fk.fisher_accumulate([fw, fb], [per_sample_w, g], backend="triton")
    torch.testing.assert_close(wf, fw)
    torch.testing.assert_close(bf, fb)


# ---------------------------------------------------------------------------------------------
# torch.library registration
# ---------------------------------------------------------------------------------------------


def test_opcheck_registered_ops():
    """Schema, fake implementation and mutation declarations of the three custom_op ops."""
    shapes = [(7,), (3, 5)]
    grads = [torch.randn(4, *s) for s in shapes]
    fisher = [torch.zeros(s) for s in shapes]
    torch.library.opcheck(torch.ops.fsmtl_triton.fisher_accumulate.default, (fisher, grads, 0.5, True))
    scores = random_scores(shapes, 2, CPU)
    torch.library.opcheck(torch.ops.fsmtl_triton.topk_mask.default, (scores, [3, 22]))
    words = fk.topk_mask_batched(scores, [3, 22], backend="reference").words
    out = [torch.empty(s) for s in shapes]
    args = ([g[:2].contiguous() for g in grads], words, "selected", out)
    torch.library.opcheck(torch.ops.fsmtl_triton.masked_grad_average.default, args)


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
def test_opcheck_linear_fisher_triton_op(with_bias):
    """linear_fisher is a triton_op: its fake implementation is the launcher itself, whose
    ``wrap_triton`` call the interpreter executes on fake tensors (it dereferences their storage),
    so the fake-tensor and AOT checks run in tests/test_triton_gpu.py on CUDA only."""
    g, a = torch.randn(6, 5), torch.randn(6, 3)
    bias = torch.zeros(5) if with_bias else None
    torch.library.opcheck(
        torch.ops.fsmtl_triton.linear_fisher.default,
        (g, a, torch.zeros(5, 3), bias, 0.5),
        test_utils=("test_schema", "test_autograd_registration"),
    )


def test_fake_topk_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        scores = [torch.empty(3, 33), torch.empty(3, 2, 2)]
        words = torch.ops.fsmtl_triton.topk_mask(scores, [1, 2, 3])
    assert words.shape == (3, 3) and words.dtype == torch.int32


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    sizes=st.lists(st.integers(0, 300), min_size=1, max_size=4),
    num_tasks=st.integers(1, 3),
    levels=st.sampled_from([2, 7, 1000]),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_topk_random_cases_match_reference(sizes, num_tasks, levels, seed, data, monkeypatch):
    """Random parameter lists (empty ones included), tie densities and per-task k, 64-entry blocks."""
    monkeypatch.setitem(_utils.INTERPRETER_BLOCKS, "topk", 64)
    gen = torch.Generator().manual_seed(seed)
    scores = [(torch.randint(-levels, levels, (num_tasks, n), generator=gen).float() / 3) for n in sizes]
    total = sum(sizes)
    ks = data.draw(st.lists(st.integers(0, total), min_size=num_tasks, max_size=num_tasks))
    assert_same_mask(scores, ks)
