"""topk_mask / topk_mask_batched on every backend: semantics, bad input, the C++ and Triton kernels
against the reference bit for bit, property tests against a sort oracle, the registered op.

Masks are compared exactly. Triton runs on CPU tensors under the interpreter (small shapes) and,
where a GPU exists, on CUDA tensors (large P).
"""

from __future__ import annotations

import pytest
import torch
from cases import (
    CPU,
    GRAD_DTYPES,
    ODD_SHAPES,
    SHAPE_IDS,
    SHAPES,
    assert_same_mask,
    assert_unchanged,
    raises_naming,
    random_scores,
    snapshot,
    tied_scores,
    total_entries,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oracle import topk_oracle

import fsmtl_kernels as fk
from fsmtl_kernels.packed_mask import word_layout


def fixture_settings(max_examples: int) -> settings:
    """Hypothesis settings for tests that also take a (parametrized, stateless) backend fixture."""
    return settings(
        max_examples=max_examples, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
    )


LARGE_P = 100_000_000


def bits(mask: fk.PackedMask, task: int = 0) -> list[list[bool]]:
    return [m.reshape(-1).tolist() for m in mask.to_bool(task)]


# ---------------------------------------------------------------------------------------------
# Semantics (exactly k, ties by position, -0 == +0, inf largest), every backend
# ---------------------------------------------------------------------------------------------


def test_ties_broken_by_parameter_then_index(backend):
    scores = [torch.tensor([1.0, 3.0, 1.0]), torch.tensor([1.0, 3.0])]
    m = fk.topk_mask(scores, 3, backend=backend)
    assert bits(m) == [[True, True, False], [False, True]]


def test_negative_zero_equals_positive_zero(backend):
    scores = [torch.tensor([-0.0, 0.0, -0.0, 1.0])]
    m = fk.topk_mask(scores, 2, backend=backend)
    assert bits(m) == [[True, False, False, True]]
    m = fk.topk_mask([torch.tensor([0.0, -0.0])], 1, backend=backend)
    assert bits(m) == [[True, False]]
    # -0.0 and +0.0 tie, so the first entries by position are taken whatever their sign.
    mask = fk.topk_mask([torch.tensor([-0.0, 0.0, -0.0, 0.0, 1.0])], 3, backend=backend)
    assert mask.to_bool()[0].tolist() == [True, True, False, False, True]


def test_inf_is_largest(backend):
    inf = float("inf")
    scores = [torch.tensor([3.0, inf, -inf]), torch.tensor([inf, 1e38])]
    m = fk.topk_mask(scores, 3, backend=backend)
    assert bits(m) == [[False, True, False], [True, True]]
    m = fk.topk_mask(scores, 4, backend=backend)
    assert bits(m) == [[True, True, False], [True, True]]


@pytest.mark.parametrize("k", [0, 1, 9, 10])
def test_k_edges(backend, k):
    scores = [torch.tensor([[0.5, 0.5], [0.25, 2.0]]), torch.tensor([7.0]), torch.tensor([0.5] * 5)]
    m = fk.topk_mask(scores, k, backend=backend)
    assert m.count().tolist() == [k]
    assert [t.tolist() for t in m.to_bool()] == [t.tolist() for t in topk_oracle(scores, k)]


def test_one_element_parameters(backend):
    scores = [torch.tensor([2.0]), torch.tensor([5.0]), torch.tensor([2.0])]
    m = fk.topk_mask(scores, 2, backend=backend)
    assert bits(m) == [[True], [True], [False]]


def test_all_equal_takes_first_k(backend):
    scores = [torch.ones(40), torch.ones(3, 11)]
    m = fk.topk_mask(scores, 45, backend=backend)
    flat = torch.cat([t.reshape(-1) for t in m.to_bool()])
    assert flat[:45].all() and not flat[45:].any()


def test_batched_tasks_have_own_k(backend):
    scores = [torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]]), torch.tensor([[0.0], [5.0]])]
    m = fk.topk_mask_batched(scores, [2, 0.5], backend=backend)
    assert m.num_tasks == 2
    assert m.count().tolist() == [2, 2]
    assert bits(m, 0) == [[False, True, True], [False]]
    assert bits(m, 1) == [[True, False, False], [True]]


@pytest.mark.parametrize("dtype", GRAD_DTYPES)
def test_low_precision_scores(backend, dtype):
    scores = [torch.tensor([0.1, 0.3, 0.2, 0.3], dtype=dtype)]
    m = fk.topk_mask(scores, 2, backend=backend)
    assert bits(m) == [[False, True, False, True]]


def test_mask_layout_is_the_packed_mask_layout(backend):
    shapes = [(0,), (33,), (1,), (2, 16)]
    m = fk.topk_mask_batched([torch.rand(2, *s) for s in shapes], [5, 60], backend=backend)
    assert m.word_offsets == word_layout([0, 33, 1, 32])[0] and m.words.shape == (2, word_layout([0, 33, 1, 32])[1])


class TestKeepRatio:
    @pytest.mark.parametrize(
        ("ratio", "total", "expected"),
        [
            (0.5, 3, 2),  # 1.5 rounds half up
            (0.5, 5, 3),  # 2.5 rounds half up (not to even)
            (0.25, 10, 3),  # 2.5 -> 3
            (0.1, 10, 1),  # binary 0.1 is a hair above 1/10
            (0.3, 10, 3),  # binary 0.3 is a hair below 3/10: 2.9999.. -> 3
            (1.0, 7, 7),
            (0.01, 10, 0),  # a tiny ratio may keep nothing
            (0.05, 10, 1),  # binary 0.05 is above 1/20, so 0.5000..1 -> 1
        ],
    )
    def test_round_half_up_on_exact_product(self, ratio, total, expected):
        assert fk.resolve_k(ratio, total) == expected

    def test_ratio_in_topk(self):
        m = fk.topk_mask([torch.arange(5.0)], 0.5)
        assert m.count().tolist() == [3]

    @settings(max_examples=100, deadline=None)
    @given(ratio=st.floats(min_value=1e-6, max_value=1.0, exclude_min=False), total=st.integers(0, 10**7))
    def test_keep_ratio_is_nearest_count(self, ratio, total):
        k = fk.resolve_k(ratio, total)
        assert 0 <= k <= total
        assert abs(k - ratio * total) <= 0.5 + 1e-9 * total


# ---------------------------------------------------------------------------------------------
# Bad input: ValueError/TypeError naming the argument, nothing modified
# ---------------------------------------------------------------------------------------------


def nan_scores():
    return [torch.tensor([1.0, 2.0]), torch.tensor([float("nan")])]


TOPK_CASES = [
    ("nan score", ValueError, "scores[1]", lambda s: fk.topk_mask(nan_scores(), 1)),
    ("k too large", ValueError, "k", lambda s: fk.topk_mask(s, 6)),
    ("k negative", ValueError, "k", lambda s: fk.topk_mask(s, -1)),
    ("k bool", TypeError, "k", lambda s: fk.topk_mask(s, True)),
    ("k string", TypeError, "k", lambda s: fk.topk_mask(s, "3")),
    ("k None", TypeError, "k", lambda s: fk.topk_mask(s, None)),
    ("ratio zero", ValueError, "k", lambda s: fk.topk_mask(s, 0.0)),
    ("ratio above one", ValueError, "k", lambda s: fk.topk_mask(s, 1.5)),
    ("ratio nan", ValueError, "k", lambda s: fk.topk_mask(s, float("nan"))),
    ("k tensor", TypeError, "k", lambda s: fk.topk_mask(s, torch.tensor(2))),
    ("integer scores", TypeError, "scores[0]", lambda s: fk.topk_mask([s[0].long(), s[1]], 2)),
    ("float64 scores", TypeError, "scores[1]", lambda s: fk.topk_mask([s[0], s[1].double()], 2)),
    ("empty scores", ValueError, "scores", lambda s: fk.topk_mask([], 2)),
    ("tensor not list", TypeError, "scores", lambda s: fk.topk_mask(s[0], 2)),
    ("non-tensor item", TypeError, "scores[1]", lambda s: fk.topk_mask([s[0], [1.0]], 2)),
    ("devices differ", ValueError, "scores[1]", lambda s: fk.topk_mask([s[0], s[1].to("meta")], 2)),
    ("batched task count", ValueError, "scores[1]", lambda s: fk.topk_mask_batched([s[0][None], s[1].repeat(2, 1)], 1)),
    ("batched k list length", ValueError, "k", lambda s: fk.topk_mask_batched([x[None] for x in s], [1, 2])),
    ("batched k item", ValueError, "k[1]", lambda s: fk.topk_mask_batched([x.repeat(2, 1) for x in s], [1, 9])),
]


@pytest.mark.parametrize(("case", "exc", "name", "call"), TOPK_CASES, ids=[c[0] for c in TOPK_CASES])
def test_rejects(case, exc, name, call):
    scores = [torch.tensor([3.0, 1.0]), torch.tensor([2.0, 0.0, 5.0])]
    before = snapshot(scores)
    raises_naming(exc, name, lambda: call(scores))
    assert_unchanged(before, scores)


# ---------------------------------------------------------------------------------------------
# Property tests against the stable-sort oracle, every backend
# ---------------------------------------------------------------------------------------------

# Few distinct values so ties are common; signed zeros and infinities included.
VALUES = st.sampled_from([0.0, -0.0, 1.0, 2.5, -1.0, 1e-30, 3.0e38, float("inf"), -float("inf"), 0.5])


@st.composite
def score_lists(draw):
    sizes = draw(st.lists(st.integers(1, 40), min_size=1, max_size=5))
    return [torch.tensor(draw(st.lists(VALUES, min_size=n, max_size=n)), dtype=torch.float32) for n in sizes]


@fixture_settings(150)
@given(scores=score_lists(), data=st.data())
def test_equals_stable_sort_oracle(backend, scores, data):
    total = sum(s.numel() for s in scores)
    k = data.draw(st.integers(0, total))
    expected = [m.tolist() for m in topk_oracle(scores, k)]
    m = fk.topk_mask(scores, k, backend=backend)
    assert m.count().tolist() == [k]
    assert [t.tolist() for t in m.to_bool()] == expected


@fixture_settings(60)
@given(
    shapes=st.lists(st.tuples(st.integers(1, 6), st.integers(1, 9)), min_size=1, max_size=4),
    num_tasks=st.integers(1, 4),
    seed=st.integers(0, 2**31 - 1),
    data=st.data(),
)
def test_batched_equals_per_task_oracle(backend, shapes, num_tasks, seed, data):
    gen = torch.Generator().manual_seed(seed)
    scores = [torch.randint(0, 4, (num_tasks, *s), generator=gen).float() for s in shapes]
    total = sum(s[0].numel() for s in scores)
    ks = [data.draw(st.integers(0, total)) for _ in range(num_tasks)]
    m = fk.topk_mask_batched(scores, ks, backend=backend)
    for t in range(num_tasks):
        expected = topk_oracle([s[t] for s in scores], ks[t])
        assert [x.tolist() for x in m.to_bool(t)] == [x.tolist() for x in expected]


# ---------------------------------------------------------------------------------------------
# C++ kernel against the reference, bit for bit
# ---------------------------------------------------------------------------------------------


def _cpp_scores(shapes, num_tasks, kind, gen):
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
def test_cpp_matches_reference(cpp, shapes, num_tasks, kind):
    gen = torch.Generator().manual_seed(hash((tuple(shapes), num_tasks, kind)) % 2**31)
    scores = _cpp_scores(shapes, num_tasks, kind, gen)
    total = sum(s[0].numel() for s in scores)
    for k in _ks(total):
        ours = fk.topk_mask_batched(scores, k, backend=cpp)
        ref = fk.topk_mask_batched(scores, k, backend="reference")
        assert torch.equal(ours.words, ref.words), f"k={k}"
        assert ours.count().tolist() == [k] * num_tasks


def test_cpp_per_task_k_and_low_precision_scores(cpp):
    gen = torch.Generator().manual_seed(1)
    scores = [torch.rand(3, 50, 7, generator=gen).half(), torch.rand(3, 1000, generator=gen).half()]
    ks = [0, 700, 1350]
    ours = fk.topk_mask_batched(scores, ks, backend=cpp)
    assert torch.equal(ours.words, fk.topk_mask_batched(scores, ks, backend="reference").words)


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
def test_cpp_large_paths(cpp, name, make):
    """Above 2**18 entries the sampled bracket runs; heavy ties and skew exercise its fallback."""
    gen = torch.Generator().manual_seed(7)
    sizes = [150_001, 7, 260_000, 33]
    scores = [make(gen, n) for n in sizes]
    total = sum(sizes)
    for ratio in (1e-5, 0.1, 0.5, 0.9, 0.99999):
        k = round(ratio * total)
        ks = [k, total - k]
        ours = fk.topk_mask_batched(scores, ks, backend=cpp)
        ref = fk.topk_mask_batched(scores, ks, backend="reference")
        assert torch.equal(ours.words, ref.words), f"{name} k={k}"


def test_cpp_deterministic_across_threads(cpp):
    gen = torch.Generator().manual_seed(3)
    scores = [torch.randint(0, 30, (3, n), generator=gen).float() for n in (300_000, 4097, 1)]
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(fk.topk_mask_batched(scores, [5, 150_000, 304_000], backend=cpp).words)
            results.append(fk.topk_mask_batched(scores, 0.37, backend=cpp).words)
    finally:
        torch.set_num_threads(before)
    for i in range(2, len(results)):
        assert torch.equal(results[i], results[i % 2]), f"run {i}"


# ---------------------------------------------------------------------------------------------
# Triton kernel against the reference, bit for bit (CPU interpreter)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_tasks", [1, 3, 8])
def test_triton_edge_counts(triton, num_tasks, blocks):
    scores = tied_scores(ODD_SHAPES, num_tasks, CPU, seed=num_tasks)
    total = total_entries(ODD_SHAPES)
    ks = [0, 1, total - 1, total, total // 2, 17, 1000, 4096][:num_tasks] if num_tasks > 1 else [total // 3]
    assert_same_mask(scores, ks, triton)


@pytest.mark.parametrize("k", [0, 1, "P-1", "P"])
def test_triton_k_extremes(triton, k):
    total = total_entries(ODD_SHAPES)
    k = {"P-1": total - 1, "P": total}.get(k, k)
    assert_same_mask(tied_scores(ODD_SHAPES, 1, CPU, seed=3), k, triton)


def test_triton_all_ties_position_order(triton, blocks):
    """Every score equal: the first k positions (parameter order, then flat index) are taken."""
    scores = [torch.full((2, *s), 0.5) for s in ODD_SHAPES]
    total = total_entries(ODD_SHAPES)
    for k in (5, 1030, total - 2):
        mask = assert_same_mask(scores, k, triton)
        flat = torch.cat([m[0].reshape(-1) for m in mask.to_bool_stacked()])
        assert flat[:k].all() and not flat[k:].any()


def test_triton_signed_zero_is_one_value(triton, blocks):
    """-0.0 and +0.0 tie: taken in position order whatever the sign."""
    gen = torch.Generator().manual_seed(5)
    scores = [torch.where(torch.rand(1, *s, generator=gen) < 0.5, -0.0, 0.0) for s in ODD_SHAPES]
    scores[2][0, 3, 4] = 1.0
    for k in (1, 2, 600, 3000):
        assert_same_mask(scores, k, triton)


def test_triton_infinities_and_extremes(triton):
    tiny = torch.finfo(torch.float32).tiny
    values = torch.tensor(
        [float("inf"), 3.4e38, 1.0, tiny / 4, tiny, 0.0, -0.0, -tiny / 4, -1.0, -3.4e38, -float("inf")]
    )
    scores = [
        values[torch.randperm(len(values), generator=torch.Generator().manual_seed(s))].repeat(1, 3) for s in (1, 2)
    ]
    total = 2 * 3 * len(values)
    for k in range(0, total + 1, 5):
        assert_same_mask(scores, k, triton)


def test_triton_matches_sort_oracle(triton):
    scores = tied_scores(ODD_SHAPES[:3], 1, CPU, seed=9)
    for k in (0, 3, 500, 1031):
        got = fk.topk_mask([s[0] for s in scores], k, backend=triton)
        want = topk_oracle([s[0] for s in scores], k)
        for g, w in zip(got.to_bool(), want, strict=True):
            assert torch.equal(g, w)


@pytest.mark.parametrize("dtype", GRAD_DTYPES)
def test_triton_low_precision_scores(triton, dtype):
    scores = [s.to(dtype) for s in random_scores(ODD_SHAPES, 3, CPU, seed=11)]
    assert_same_mask(scores, [0.1, 0.5, 0.9], triton)


def test_triton_distinct_random_scores(triton, blocks):
    scores = random_scores(ODD_SHAPES, 3, CPU, seed=4)
    total = total_entries(ODD_SHAPES)
    assert_same_mask(scores, [1, total // 2, total - 1], triton)


def test_triton_alignment_groups_keep_position_order(triton, blocks):
    """Parameters allowing vector loads (16-byte aligned, size a multiple of 8) launch apart from
    the others; ties must still be ranked in parameter order across both launches."""
    from fsmtl_kernels.triton import _utils

    assert _utils.is_aligned((64,), 16) and not _utils.is_aligned((64,), 7) and not _utils.is_aligned((8,), 16)
    shapes = [(7,), (64,), (33,), (8, 16), (1,), (1024,)]
    scores = [torch.full((3, *s), 0.5) for s in shapes]
    scores[3][:, 2, 3] = 2.0
    offset_view = torch.full((3, 1 + 64), 0.5)[:, 1:]  # size 64, misaligned storage: unaligned group
    total = total_entries(shapes)
    assert_same_mask(scores, [1, 40, total - 3], triton)
    assert_same_mask([*scores, offset_view.contiguous()], [0, 100, 700], triton)


@fixture_settings(12)
@given(
    sizes=st.lists(st.integers(0, 300), min_size=1, max_size=4),
    num_tasks=st.integers(1, 3),
    levels=st.sampled_from([2, 7, 1000]),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_triton_random_cases_match_reference(triton, sizes, num_tasks, levels, seed, data, monkeypatch):
    """Random parameter lists (empty ones included), tie densities and per-task k, 64-entry blocks."""
    from fsmtl_kernels.triton import _utils

    monkeypatch.setitem(_utils.INTERPRETER_BLOCKS, "topk", 64)
    gen = torch.Generator().manual_seed(seed)
    scores = [(torch.randint(-levels, levels, (num_tasks, n), generator=gen).float() / 3) for n in sizes]
    total = sum(sizes)
    ks = data.draw(st.lists(st.integers(0, total), min_size=num_tasks, max_size=num_tasks))
    assert_same_mask(scores, ks, triton)


# ---------------------------------------------------------------------------------------------
# Triton's sampled path (bracket, classify, candidates, fallback), small inputs under the interpreter
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def sampled(triton, monkeypatch):
    """The Triton backend with the sampled path on from 64 entries (a 64-score sample)."""
    from fsmtl_kernels.triton import topk_mask as tk

    monkeypatch.setattr(tk, "MIN_SAMPLED", 64)
    monkeypatch.setattr(tk, "SAMPLE", 64)
    monkeypatch.setattr(tk, "CAP_PAD", 16)
    return tk


def routes(tk, scores, ks) -> list[int]:
    """Each task's ROUTE flags after a sampled select, the masks checked against the reference."""
    layout = word_layout([s[0].numel() for s in scores])
    words, state = tk.topk_select([s.contiguous() for s in scores], ks, *layout)
    want = fk.topk_mask_batched(scores, ks, backend="reference").words
    assert torch.equal(words, want), "packed words differ from the reference"
    return state[:, tk.ROUTE.value].tolist()


def test_sampled_routes(sampled, monkeypatch):
    """Each way the classify pass can place the k-th key, and both ways of ranking split ties."""
    tk = sampled
    gen = torch.Generator().manual_seed(0)
    distinct = [torch.rand(2, 300, generator=gen), torch.rand(2, 7, 11, generator=gen)]
    assert routes(tk, distinct, [40, 200]) == [tk.ROUTE_CANDIDATES] * 2
    # Few levels: the k-th key is the bracket's end, its ties outside the candidates are counted.
    levels = [torch.randint(0, 3, (1, 500), generator=gen).float()]
    assert routes(tk, levels, [250]) == [tk.ROUTE_CANDIDATES + tk.ROUTE_TIE_GATHER]
    monkeypatch.setattr(tk, "SIGMAS", 0.0)
    monkeypatch.setattr(tk, "MARGIN_RANKS", 0)
    route = routes(tk, levels, [250])[0]
    assert route & (tk.ROUTE_HI | tk.ROUTE_LO) and route & tk.ROUTE_TIE_COUNT
    # A candidate buffer too small for the bracket: the task falls back.
    monkeypatch.setattr(tk, "SIGMAS", 6.0)
    monkeypatch.setattr(tk, "MARGIN_RANKS", 16)
    assert routes(tk, distinct, [0, 1])[1] == tk.ROUTE_CANDIDATES
    monkeypatch.setattr(tk, "CAP_FACTOR", 0.0)
    monkeypatch.setattr(tk, "CAP_PAD", 0)
    assert routes(tk, distinct, [40, 200]) == [tk.ROUTE_FALLBACK] * 2


def test_sampled_many_ties_among_candidates_are_counted(sampled, monkeypatch):
    tk = sampled
    monkeypatch.setattr(tk, "TIE_CAP", tk.tl.constexpr(4))
    # 100 scores above 0.5, 50 ties at 0.5 (the 120th largest), 50 below.
    scores = [torch.cat([torch.full((1, 50), 0.5), torch.rand(1, 100) + 1.0, torch.rand(1, 50) / 4], dim=1)]
    assert routes(tk, scores, [120]) == [tk.ROUTE_CANDIDATES + tk.ROUTE_TIE_COUNT]
    monkeypatch.setattr(tk, "TIE_CAP", tk.tl.constexpr(64))
    assert routes(tk, scores, [120]) == [tk.ROUTE_CANDIDATES + tk.ROUTE_TIE_GATHER]


@pytest.mark.parametrize("dtype", GRAD_DTYPES)
def test_sampled_low_precision_scores(sampled, dtype):
    scores = [s.to(dtype) for s in random_scores([(7,), (13, 17), (1,)], 3, CPU, seed=2)]
    assert_same_mask(scores, [0.1, 0.5, 0.9], sampled and "triton")


def test_sampled_mixed_dtypes_and_alignment_groups(sampled):
    """fp16, an odd-sized fp32 parameter (no vector loads), bf16 and fp32: four launch groups share
    the positions and tie ranks."""
    gen = torch.Generator().manual_seed(12)
    scores = [torch.rand(2, 40, generator=gen).half(), torch.rand(2, 33, generator=gen), torch.rand(2, 64).bfloat16()]
    scores.append(torch.rand(2, 64, generator=gen))
    for k in (1, 50, 100, 201):
        assert_same_mask(scores, [k, 202 - k], "triton")


def test_sampled_signed_zeros_infinities_and_empty_parameters(sampled):
    gen = torch.Generator().manual_seed(8)
    values = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 1e-38, 3.0e38, -2.0, 0.5])
    scores = [values[torch.randint(0, 8, (2, *s), generator=gen)] for s in [(0,), (37,), (0, 3), (9, 9), (1,)]]
    total = 37 + 81 + 1
    for k in (1, 30, total // 2, total - 1):
        assert_same_mask(scores, [k, total - k], "triton")


def test_sampled_nan_named_and_nothing_returned(sampled):
    scores = [torch.rand(1, 50), torch.rand(1, 3), torch.rand(1, 60)]
    scores[2][0, 41] = float("nan")
    raises_naming(ValueError, "scores[2]", lambda: fk.topk_mask_batched(scores, 10, backend="triton"))
    raises_naming(ValueError, "scores[1]", lambda: fk.topk_mask([torch.rand(70), torch.tensor([float("nan")])], 0))


@fixture_settings(15)
@given(
    sizes=st.lists(st.integers(0, 200), min_size=1, max_size=3).filter(lambda s: sum(s) >= 64),
    num_tasks=st.integers(1, 3),
    levels=st.sampled_from([2, 9, 1000]),
    sigmas=st.sampled_from([0.0, 1.0, 6.0]),
    cap_pad=st.sampled_from([0, 8, 4096]),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_sampled_random_cases_match_reference(
    sampled, monkeypatch, sizes, num_tasks, levels, sigmas, cap_pad, seed, data
):
    """Random lists, tie densities, bracket widths and candidate capacities (every route), 64-entry blocks."""
    from fsmtl_kernels.triton import _utils

    monkeypatch.setattr(sampled, "SIGMAS", sigmas)
    monkeypatch.setattr(sampled, "CAP_PAD", cap_pad)
    monkeypatch.setitem(_utils.INTERPRETER_BLOCKS, "topk", 64)
    gen = torch.Generator().manual_seed(seed)
    scores = [torch.randint(0, levels, (num_tasks, n), generator=gen).float() / 7 for n in sizes]
    total = sum(sizes)
    ks = data.draw(st.lists(st.integers(0, total), min_size=num_tasks, max_size=num_tasks))
    assert_same_mask(scores, ks, "triton")


# ---------------------------------------------------------------------------------------------
# The registered op torch.ops.fsmtl.topk_mask
# ---------------------------------------------------------------------------------------------


def test_opcheck(cpp):
    gen = torch.Generator().manual_seed(6)
    scores = [torch.rand(2, 5, 7, generator=gen), torch.rand(2, 40, generator=gen)]
    offsets, n_words = word_layout([35, 40])
    torch.library.opcheck(torch.ops.fsmtl.topk_mask.default, (scores, [3, 70], offsets, n_words))


def test_fake_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        scores = [torch.empty(3, 33), torch.empty(3, 2, 2)]
        words = torch.ops.fsmtl.topk_mask(scores, [1, 2, 3], [0, 2], 3)
    assert words.shape == (3, 3) and words.dtype == torch.int32


def test_composes_with_torch_compile(cpp):
    scores = [torch.rand(2, 300), torch.rand(2, 7)]
    offsets, n_words = word_layout([300, 7])

    @torch.compile(fullgraph=True, backend="eager")
    def masks(s):
        return torch.ops.fsmtl.topk_mask(s, [10, 200], offsets, n_words)

    assert torch.equal(masks(scores), fk.topk_mask_batched(scores, [10, 200], backend="reference").words)


# ---------------------------------------------------------------------------------------------
# Triton on a CUDA GPU
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_tasks", [1, 3, 8])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (no GPU here)")
def test_gpu_edge_counts(cuda, num_tasks, blocks):
    total = total_entries(ODD_SHAPES)
    scores = tied_scores(ODD_SHAPES, num_tasks, cuda, seed=num_tasks)
    ks = [0, 1, total - 1, total, total // 2, 17, 1000, 4096][:num_tasks] if num_tasks > 1 else [total // 3]
    assert_same_mask(scores, ks)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (no GPU here)")
def test_gpu_ties_zeros_infinities(cuda, blocks):
    total = total_entries(ODD_SHAPES)
    equal = [torch.full((2, *s), 0.5, device=cuda) for s in ODD_SHAPES]
    zeros = [torch.where(torch.rand(1, *s, device=cuda) < 0.5, -0.0, 0.0) for s in ODD_SHAPES]
    for k in (0, 1, 5, 1030, total - 1, total):
        assert_same_mask(equal, k)
        assert_same_mask(zeros, k)
    assert_same_mask(tied_scores(ODD_SHAPES, 3, cuda, seed=5), [1, 2000, total])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (no GPU here)")
@pytest.mark.parametrize("dtype", GRAD_DTYPES)
def test_gpu_low_precision(cuda, dtype):
    assert_same_mask([s.to(dtype) for s in random_scores(ODD_SHAPES, 3, cuda)], [0.1, 0.5, 0.9])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (no GPU here)")
@pytest.mark.parametrize("ratio", [0.1, 0.5, 0.9])
def test_gpu_large_p(cuda, ratio):
    """P = 1e8 split over uneven parameters, values on a coarse grid (many ties at the threshold)."""
    sizes = [1, 7, 1023, 4097, LARGE_P - 1 - 7 - 1023 - 4097]
    gen = torch.Generator(device=cuda).manual_seed(0)
    scores = [torch.randint(0, 4096, (1, n), device=cuda, generator=gen).float() / 64 for n in sizes]
    assert_same_mask(scores, ratio)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (no GPU here)")
@pytest.mark.parametrize("dtype", GRAD_DTYPES)
def test_gpu_sampled_path_continuous_scores(cuda, dtype):
    """P = 1e7 uniform and squared-normal scores (the sampled path, candidates, few ties) at
    k = 10, 50, 90% and the extremes, against the reference; fp32 tasks take the candidates."""
    from fsmtl_kernels.triton import topk_mask as tk

    sizes = [7, 4097, 3_000_001, 6_995_895]
    gen = torch.Generator(device=cuda).manual_seed(3)
    uniform = [torch.rand(1, n, device=cuda, generator=gen).to(dtype) for n in sizes]
    squares = [torch.randn(1, n, device=cuda, generator=gen).square().to(dtype) for n in sizes]
    total = sum(sizes)
    for scores in (uniform, squares):
        assert_same_mask([torch.cat([s, s.flip(1)]) for s in scores], [0.1, 0.9])
        assert_same_mask(scores, 0.5)
        assert_same_mask(scores, 1)
        assert_same_mask(scores, total - 1)
        if dtype == torch.float32:  # low precision: long tie runs may sit at the bracket's ends
            _, state = tk.topk_select(scores, [total // 2], *word_layout(sizes))
            assert state[0, tk.ROUTE.value].item() & tk.ROUTE_CANDIDATES


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (no GPU here)")
def test_gpu_opcheck(cuda):
    scores = random_scores([(7,), (3, 5)], 2, cuda)
    torch.library.opcheck(torch.ops.fsmtl.topk_mask.default, (scores, [3, 22], *word_layout([7, 15])))
