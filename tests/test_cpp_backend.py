"""The C++/OpenMP CPU backend (``csrc/``, ``fsmtl_kernels.cpp``) against the reference.

Masks must equal the reference's bit for bit; float results must lie within float32 rounding of
a float64 computation. Skipped as a whole, with the reason, when the extension is not built.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import fsmtl_kernels as fk
from fsmtl_kernels import backends
from fsmtl_kernels.mask import PackedMask

_REASON = backends.unavailable_reason("cpp", torch.device("cpu"))
if _REASON is not None:
    pytest.skip(f"C++ backend unavailable: {_REASON}", allow_module_level=True)

from fsmtl_kernels import cpp  # noqa: E402  (only importable usefully once the extension loads)

SHAPES = [
    [(1,)],
    [(7,)],
    [(123,)],
    [(1023,)],
    [(4097,)],
    [(3, 41), (1,), (7, 9, 5), (4097,), (1023,), (2, 2)],
]
SHAPE_IDS = ["1", "7", "123", "1023", "4097", "mixed"]
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def _scores(shapes, num_tasks, kind, gen):
    """Scores ``[T, *shape]`` of one kind: 'ties' (few distinct values, +-0.0, +-inf) or 'rand'."""
    out = []
    for shape in shapes:
        if kind == "ties":
            values = torch.tensor([0.0, -0.0, 1.0, 2.0, float("inf"), float("-inf"), -3.0, 0.5])
            idx = torch.randint(0, len(values), (num_tasks, *shape), generator=gen)
            out.append(values[idx])
        else:
            out.append(torch.randn(num_tasks, *shape, generator=gen))
    return out


def _ks(total):
    return sorted({0, 1, max(total - 1, 0), total, total // 2, (total + 2) // 3})


@pytest.mark.parametrize("num_tasks", [1, 3, 8])
@pytest.mark.parametrize("shapes", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("kind", ["ties", "rand"])
def test_topk_mask_matches_reference(shapes, num_tasks, kind):
    gen = torch.Generator().manual_seed(hash((tuple(shapes), num_tasks, kind)) % 2**31)
    scores = _scores(shapes, num_tasks, kind, gen)
    total = sum(s[0].numel() for s in scores)
    for k in _ks(total):
        ours = fk.topk_mask_batched(scores, k, backend="cpp")
        ref = fk.topk_mask_batched(scores, k, backend="reference")
        assert torch.equal(ours.words, ref.words), f"k={k}"
        assert ours.count().tolist() == [k] * num_tasks


def test_topk_mask_per_task_k_and_low_precision_scores():
    gen = torch.Generator().manual_seed(1)
    scores = [torch.rand(3, 50, 7, generator=gen).half(), torch.rand(3, 1000, generator=gen).half()]
    ks = [0, 700, 1350]
    ours = fk.topk_mask_batched(scores, ks, backend="cpp")
    assert torch.equal(ours.words, fk.topk_mask_batched(scores, ks, backend="reference").words)


def test_topk_mask_signed_zero_equal():
    # -0.0 and +0.0 tie, so the first entries by position are taken whatever their sign.
    scores = [torch.tensor([[-0.0, 0.0, -0.0, 0.0, 1.0]])]
    mask = fk.topk_mask(scores[0].unbind(0), 3, backend="cpp")
    assert mask.to_bool()[0].tolist() == [True, True, False, False, True]


LARGE = [
    ("uniform", lambda g, n: torch.rand(2, n, generator=g)),
    ("squares", lambda g, n: torch.randn(2, n, generator=g).square()),
    ("mostly_zero", lambda g, n: torch.where(torch.rand(2, n, generator=g) < 0.6, 0.0, torch.rand(2, n, generator=g))),
    ("few_values", lambda g, n: torch.randint(0, 5, (2, n), generator=g).float()),
    ("ascending", lambda g, n: torch.arange(2 * n, dtype=torch.float32).reshape(2, n)),
    ("constant", lambda g, n: torch.full((2, n), 3.0)),
    ("negative", lambda g, n: -torch.rand(2, n, generator=g)),
]


@pytest.mark.parametrize("name,make", LARGE, ids=[n for n, _ in LARGE])
def test_topk_mask_large_paths(name, make):
    """Above 2**18 entries the sampled bracket runs; heavy ties and skew exercise its fallback."""
    gen = torch.Generator().manual_seed(7)
    sizes = [150_001, 7, 260_000, 33]
    scores = [make(gen, n) for n in sizes]
    total = sum(sizes)
    for ratio in (1e-5, 0.1, 0.5, 0.9, 0.99999):
        k = round(ratio * total)
        ks = [k, total - k]
        ours = fk.topk_mask_batched(scores, ks, backend="cpp")
        ref = fk.topk_mask_batched(scores, ks, backend="reference")
        assert torch.equal(ours.words, ref.words), f"{name} k={k}"


def test_topk_mask_deterministic_across_threads():
    gen = torch.Generator().manual_seed(3)
    scores = [torch.randint(0, 30, (3, n), generator=gen).float() for n in (300_000, 4097, 1)]
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(fk.topk_mask_batched(scores, [5, 150_000, 304_000], backend="cpp").words)
            results.append(fk.topk_mask_batched(scores, 0.37, backend="cpp").words)
    finally:
        torch.set_num_threads(before)
    for i in range(2, len(results)):
        assert torch.equal(results[i], results[i % 2]), f"run {i}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shapes", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("per_sample", [True, False])
def test_fisher_accumulate_matches_float64(shapes, dtype, per_sample):
    gen = torch.Generator().manual_seed(5)
    n = 5
    fisher = [torch.rand(s, generator=gen) for s in shapes]
    grads = [torch.randn((n, *s) if per_sample else s, generator=gen).to(dtype) for s in shapes]
    expected = []
    for f, g in zip(fisher, grads, strict=True):
        sq = g.double().square()
        expected.append(f.double() + 0.25 * (sq.sum(0) if per_sample else sq))
    fk.fisher_accumulate(fisher, grads, scale=0.25, backend="cpp")
    for f, e in zip(fisher, expected, strict=True):
        assert f.dtype == torch.float32
        torch.testing.assert_close(f.double(), e, rtol=2e-6, atol=1e-6)


def test_fisher_accumulate_half_squares_do_not_overflow_and_views_are_written():
    grads = [torch.full((4, 3, 5), 60000.0, dtype=torch.float16)]
    base = torch.zeros(5, 3)
    fisher = [base.t()]  # a non-contiguous view: the backend must write through it
    fk.fisher_accumulate(fisher, grads, backend="cpp")
    assert torch.isfinite(base).all()
    torch.testing.assert_close(base, torch.full((5, 3), 4 * 60000.0**2))


@pytest.mark.parametrize("num_tasks", [1, 3, 8])
@pytest.mark.parametrize("shapes", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("normalize", ["tasks", "selected"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_grad_average_matches_float64(shapes, num_tasks, normalize, dtype):
    gen = torch.Generator().manual_seed(11)
    grads = [torch.randn(num_tasks, *s, generator=gen).to(dtype) for s in shapes]
    bools = [torch.rand(num_tasks, *s, generator=gen) < 0.5 for s in shapes]
    mask = PackedMask.from_bool_stacked(bools)
    ours = fk.masked_grad_average(grads, mask, normalize=normalize, backend="cpp")
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
def test_masked_grad_average_into_param_grads(param_dtype):
    gen = torch.Generator().manual_seed(2)
    shapes = [(7, 3), (1023,)]
    params = [torch.zeros(s, dtype=param_dtype) for s in shapes]
    params[0].grad = torch.full((3, 7), 9.0, dtype=param_dtype).t()  # non-contiguous, overwritten
    grads = [torch.randn(3, *s, generator=gen) for s in shapes]
    mask = PackedMask.from_bool_stacked([torch.rand(3, *s, generator=gen) < 0.3 for s in shapes])
    ref = fk.masked_grad_average(grads, mask, normalize="selected", backend="reference")
    out = fk.masked_grad_average(grads, mask, normalize="selected", params=params, backend="cpp")
    for p, o, r in zip(params, out, ref, strict=True):
        assert o is p.grad and o.dtype == param_dtype
        torch.testing.assert_close(o, r.to(param_dtype))


def test_masked_grad_average_inf_gradient_like_reference():
    grads = [torch.tensor([[float("inf"), 1.0, 2.0], [3.0, float("-inf"), 4.0]])]
    mask = PackedMask.from_bool_stacked([torch.tensor([[True, False, True], [True, False, False]])])
    for normalize in ("tasks", "selected"):
        ours = fk.masked_grad_average(grads, mask, normalize=normalize, backend="cpp")[0]
        ref = fk.masked_grad_average(grads, mask, normalize=normalize, backend="reference")[0]
        torch.testing.assert_close(ours, ref, equal_nan=True)


def test_results_deterministic_across_threads():
    gen = torch.Generator().manual_seed(4)
    grads = [torch.randn(8, 50_000, generator=gen).half(), torch.randn(8, 123, generator=gen)]
    mask = PackedMask.from_bool_stacked([torch.rand(8, g.shape[1], generator=gen) < 0.5 for g in grads])
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            fisher = [torch.zeros(g.shape[1:]) for g in grads]
            fk.fisher_accumulate(fisher, grads, backend="cpp")
            outs.append(fisher + fk.masked_grad_average(grads, mask, normalize="selected", backend="cpp"))
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*outs, strict=True):
        assert torch.equal(a, b)


def test_linear_fisher_matches_float64():
    gen = torch.Generator().manual_seed(9)
    g = torch.randn(33, 17, generator=gen)
    a = torch.randn(33, 123, generator=gen).bfloat16()
    wf, bf = torch.rand(17, 123, generator=gen), torch.rand(17, generator=gen)
    expected_w = wf.double() + 0.5 * (g.double().square().t() @ a.double().square())
    expected_b = bf.double() + 0.5 * g.double().square().sum(0)
    fk.linear_fisher(g, a, wf, bf, scale=0.5, backend="cpp")
    torch.testing.assert_close(wf.double(), expected_w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bf.double(), expected_b, rtol=1e-5, atol=1e-5)


def test_auto_picks_cpp_on_cpu():
    assert backends.select("auto", torch.device("cpu")) is cpp
    assert "cpp" in fk.available_backends("cpu")
    assert cpp.unavailable_reason(torch.device("meta")) is not None


def test_opcheck_registered_ops():
    gen = torch.Generator().manual_seed(6)
    scores = [torch.rand(2, 5, 7, generator=gen), torch.rand(2, 40, generator=gen)]
    torch.library.opcheck(torch.ops.fsmtl.topk_mask.default, (scores, [3, 70]))
    fisher = [torch.rand(5, 7, generator=gen), torch.rand(40, generator=gen)]
    grads = [torch.randn(4, 5, 7, generator=gen), torch.randn(4, 40, generator=gen)]
    torch.library.opcheck(torch.ops.fsmtl.fisher_accumulate.default, (fisher, grads, 0.5, True))
    mask = fk.topk_mask_batched(scores, 30, backend="cpp")
    out = [torch.empty(5, 7), torch.empty(40)]
    args = ([g[:2] for g in grads], mask.words, mask.word_offsets, True, out)
    torch.library.opcheck(torch.ops.fsmtl.masked_grad_average.default, args)


def test_ops_compose_with_torch_compile():
    scores = [torch.rand(2, 300), torch.rand(2, 7)]

    @torch.compile(fullgraph=True, backend="eager")
    def masks(s):
        return torch.ops.fsmtl.topk_mask(s, [10, 200])

    assert torch.equal(masks(scores), fk.topk_mask_batched(scores, [10, 200], backend="reference").words)


def test_missing_extension_warns_once_and_auto_falls_back():
    code = (
        "import sys, warnings\n"
        "sys.modules['fsmtl_kernels._C'] = None\n"
        "warnings.simplefilter('always')\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    import torch, fsmtl_kernels as fk\n"
        "    from fsmtl_kernels import backends\n"
        "    cpu = torch.device('cpu')\n"
        "    reasons = {backends.unavailable_reason('cpp', cpu) for _ in range(3)}\n"
        "    mask = fk.topk_mask([torch.tensor([3.0, 1.0, 2.0])], 2)\n"
        "    assert backends.select('auto', cpu) is backends.reference\n"
        "mine = [w for w in caught if 'C++ backend unavailable' in str(w.message)]\n"
        "assert len(mine) == 1, [str(w.message) for w in caught]\n"
        "(reason,) = reasons\n"
        "assert 'fsmtl_kernels._C is not built' in reason and 'pip install --no-build-isolation -e .' in reason\n"
        "assert '\\n' not in reason\n"
        "assert mask.to_bool()[0].tolist() == [True, False, True]\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("FSMTL_CPP_JIT", "FSMTL_BACKEND")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]
