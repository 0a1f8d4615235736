"""Hand-made cases that pin down the semantics (DESIGN.md section 2), run on every available backend."""

import pytest
import torch
from oracle import fisher_oracle, masked_average_oracle, topk_oracle

import fsmtl_kernels as fk

BACKENDS = fk.available_backends("cpu")


def bits(mask: fk.PackedMask, task: int = 0) -> list[list[bool]]:
    return [m.reshape(-1).tolist() for m in mask.to_bool(task)]


@pytest.mark.parametrize("backend", BACKENDS)
class TestTopK:
    def test_ties_broken_by_parameter_then_index(self, backend):
        scores = [torch.tensor([1.0, 3.0, 1.0]), torch.tensor([1.0, 3.0])]
        m = fk.topk_mask(scores, 3, backend=backend)
        assert bits(m) == [[True, True, False], [False, True]]

    def test_negative_zero_equals_positive_zero(self, backend):
        scores = [torch.tensor([-0.0, 0.0, -0.0, 1.0])]
        m = fk.topk_mask(scores, 2, backend=backend)
        assert bits(m) == [[True, False, False, True]]
        m = fk.topk_mask([torch.tensor([0.0, -0.0])], 1, backend=backend)
        assert bits(m) == [[True, False]]

    def test_inf_is_largest(self, backend):
        inf = float("inf")
        scores = [torch.tensor([3.0, inf, -inf]), torch.tensor([inf, 1e38])]
        m = fk.topk_mask(scores, 3, backend=backend)
        assert bits(m) == [[False, True, False], [True, True]]
        m = fk.topk_mask(scores, 4, backend=backend)
        assert bits(m) == [[True, True, False], [True, True]]

    @pytest.mark.parametrize("k", [0, 1, 9, 10])
    def test_k_edges(self, backend, k):
        scores = [torch.tensor([[0.5, 0.5], [0.25, 2.0]]), torch.tensor([7.0]), torch.tensor([0.5] * 5)]
        m = fk.topk_mask(scores, k, backend=backend)
        assert m.count().tolist() == [k]
        assert [t.tolist() for t in m.to_bool()] == [t.tolist() for t in topk_oracle(scores, k)]

    def test_one_element_parameters(self, backend):
        scores = [torch.tensor([2.0]), torch.tensor([5.0]), torch.tensor([2.0])]
        m = fk.topk_mask(scores, 2, backend=backend)
        assert bits(m) == [[True], [True], [False]]

    def test_all_equal_takes_first_k(self, backend):
        scores = [torch.ones(40), torch.ones(3, 11)]
        m = fk.topk_mask(scores, 45, backend=backend)
        flat = torch.cat([t.reshape(-1) for t in m.to_bool()])
        assert flat[:45].all() and not flat[45:].any()

    def test_batched_tasks_have_own_k(self, backend):
        scores = [torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]]), torch.tensor([[0.0], [5.0]])]
        m = fk.topk_mask_batched(scores, [2, 0.5], backend=backend)
        assert m.num_tasks == 2
        assert m.count().tolist() == [2, 2]
        assert bits(m, 0) == [[False, True, True], [False]]
        assert bits(m, 1) == [[True, False, False], [True]]

    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
    def test_low_precision_scores(self, backend, dtype):
        scores = [torch.tensor([0.1, 0.3, 0.2, 0.3], dtype=dtype)]
        m = fk.topk_mask(scores, 2, backend=backend)
        assert bits(m) == [[False, True, False, True]]


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


@pytest.mark.parametrize("backend", BACKENDS)
class TestFisherAccumulate:
    @pytest.mark.parametrize(
        ("dtype", "atol", "rtol"),
        [(torch.float32, 1e-5, 1e-5), (torch.float16, 1e-5, 1e-5), (torch.bfloat16, 1e-5, 1e-5)],
    )
    @pytest.mark.parametrize("per_sample", [True, False])
    def test_matches_float64(self, backend, dtype, atol, rtol, per_sample):
        torch.manual_seed(0)
        shapes = [(1,), (7,), (3, 5), (2, 3, 4)]
        grads = [torch.randn((4, *s) if per_sample else s).to(dtype) for s in shapes]
        fisher = [torch.full(s, 0.5) for s in shapes]
        fk.fisher_accumulate(fisher, grads, scale=0.25, backend=backend)
        # grads are exactly representable in float32, so the only error is float32 summation.
        for f, ref in zip(fisher, fisher_oracle(grads, per_sample)):
            torch.testing.assert_close(f.double(), 0.5 + 0.25 * ref, atol=atol, rtol=rtol)

    def test_fp16_squares_do_not_overflow(self, backend):
        g = torch.full((2, 3), 60000.0, dtype=torch.float16)
        fisher = [torch.zeros(3)]
        fk.fisher_accumulate(fisher, [g], backend=backend)
        assert torch.isfinite(fisher[0]).all()
        torch.testing.assert_close(fisher[0], torch.full((3,), 2 * 60000.0**2))

    def test_returns_the_same_buffers(self, backend):
        fisher = [torch.zeros(3)]
        out = fk.fisher_accumulate(fisher, [torch.ones(3)], backend=backend)
        assert out[0] is fisher[0]


@pytest.mark.parametrize("backend", BACKENDS)
class TestMaskedAverage:
    @pytest.mark.parametrize("normalize", ["tasks", "selected"])
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
    def test_matches_loop(self, backend, normalize, dtype):
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

    def test_selected_is_zero_where_no_task_selected(self, backend):
        grads = [torch.ones(2, 4)]
        mask = fk.PackedMask.from_bool_stacked([torch.tensor([[1, 0, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)])
        out = fk.masked_grad_average(grads, mask, normalize="selected", backend=backend)
        assert out[0].tolist() == [1.0, 0.0, 1.0, 0.0]
        out = fk.masked_grad_average(grads, mask, normalize="tasks", backend=backend)
        assert out[0].tolist() == [1.0, 0.0, 0.5, 0.0]

    def test_writes_param_grad(self, backend):
        p = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
        grads = [torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])]
        mask = fk.PackedMask.from_bool_stacked([torch.ones(2, 3, dtype=torch.bool)])
        out = fk.masked_grad_average(grads, mask, params=[p], backend=backend)
        assert out[0] is p.grad and p.grad.dtype == torch.float64
        assert p.grad.tolist() == [2.0, 2.0, 2.0]
        existing = p.grad
        fk.masked_grad_average(grads, mask, params=[p], backend=backend)
        assert p.grad is existing


def test_fisher_topk_single_and_batched_agree():
    torch.manual_seed(2)
    params = [torch.zeros(5, 3), torch.zeros(4)]
    grads_a = [torch.randn(6, *p.shape) for p in params]
    grads_b = [torch.randn(*p.shape) for p in params]
    single_a = fk.fisher_topk(params, grads_a, 7)
    single_b = fk.fisher_topk(params, grads_b, 0.5)
    both = fk.fisher_topk_batched(params, [grads_a, grads_b], [7, 0.5])
    assert both.task(0) == single_a and both.task(1) == single_b
    fisher = [(g**2).sum(0) for g in grads_a]
    assert [m.tolist() for m in single_a.to_bool()] == [m.tolist() for m in topk_oracle(fisher, 7)]


def test_linear_fisher_equals_per_sample_squares():
    torch.manual_seed(3)
    g, a = torch.randn(9, 5), torch.randn(9, 7)
    w, b = torch.zeros(5, 7), torch.zeros(5)
    fk.linear_fisher(g, a, w, b, scale=0.5)
    per_sample = torch.einsum("no,ni->noi", g.double(), a.double())
    torch.testing.assert_close(w.double(), 0.5 * (per_sample**2).sum(0))
    torch.testing.assert_close(b.double(), 0.5 * (g.double() ** 2).sum(0))
