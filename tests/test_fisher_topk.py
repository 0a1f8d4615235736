"""fisher_topk / fisher_topk_batched on every backend: Fisher from gradients, then the exact top-K."""

from __future__ import annotations

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
