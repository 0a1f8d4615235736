"""Property tests: top-K against an independent sort-based oracle on random inputs with many ties."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from oracle import topk_oracle

import fsmtl_kernels as fk

BACKENDS = fk.available_backends("cpu")

# Few distinct values so ties are common; signed zeros and infinities included.
VALUES = st.sampled_from([0.0, -0.0, 1.0, 2.5, -1.0, 1e-30, 3.0e38, float("inf"), -float("inf"), 0.5])


@st.composite
def score_lists(draw):
    sizes = draw(st.lists(st.integers(1, 40), min_size=1, max_size=5))
    return [torch.tensor(draw(st.lists(VALUES, min_size=n, max_size=n)), dtype=torch.float32) for n in sizes]


@settings(max_examples=150, deadline=None)
@given(scores=score_lists(), data=st.data())
def test_topk_equals_stable_sort_oracle(scores, data):
    total = sum(s.numel() for s in scores)
    k = data.draw(st.integers(0, total))
    expected = [m.tolist() for m in topk_oracle(scores, k)]
    for backend in BACKENDS:
        m = fk.topk_mask(scores, k, backend=backend)
        assert m.count().tolist() == [k]
        assert [t.tolist() for t in m.to_bool()] == expected


@settings(max_examples=60, deadline=None)
@given(
    shapes=st.lists(st.tuples(st.integers(1, 6), st.integers(1, 9)), min_size=1, max_size=4),
    num_tasks=st.integers(1, 4),
    seed=st.integers(0, 2**31 - 1),
    data=st.data(),
)
def test_batched_topk_equals_per_task_oracle(shapes, num_tasks, seed, data):
    gen = torch.Generator().manual_seed(seed)
    scores = [torch.randint(0, 4, (num_tasks, *s), generator=gen).float() for s in shapes]
    total = sum(s[0].numel() for s in scores)
    ks = [data.draw(st.integers(0, total)) for _ in range(num_tasks)]
    for backend in BACKENDS:
        m = fk.topk_mask_batched(scores, ks, backend=backend)
        for t in range(num_tasks):
            expected = topk_oracle([s[t] for s in scores], ks[t])
            assert [x.tolist() for x in m.to_bool(t)] == [x.tolist() for x in expected]


@settings(max_examples=100, deadline=None)
@given(ratio=st.floats(min_value=1e-6, max_value=1.0, exclude_min=False), total=st.integers(0, 10**7))
def test_keep_ratio_is_nearest_count(ratio, total):
    k = fk.resolve_k(ratio, total)
    assert 0 <= k <= total
    assert abs(k - ratio * total) <= 0.5 + 1e-9 * total
