"""The autograd-graph walker shared by the Fisher engine and the masked backward, the unchecked
kernel entry and PackedMask's per-entry task counts."""

from __future__ import annotations

import pytest
import torch

import fsmtl_kernels as fk
from fsmtl_kernels import autograd_graph


def test_walk_reaches_every_leaf_once_and_counts_its_uses():
    a, b, c = (torch.randn(3, requires_grad=True) for _ in range(3))
    h = a * 2
    loss = (h * b).sum() + (h * a).sum()  # a used twice (through h and directly), b once, c never
    nodes = [n for n, _ in autograd_graph.walk([loss.grad_fn])]
    assert len(nodes) == len(set(nodes))
    assert autograd_graph.reached_leaves([loss.grad_fn]) == {id(a), id(b)}
    uses = autograd_graph.leaf_uses(loss.grad_fn)
    assert uses[id(a)] == 2 and uses[id(b)] == 1 and id(c) not in uses
    assert autograd_graph.leaf_tensor(loss.grad_fn) is None


def test_a_stopped_edge_is_not_followed():
    a, b = torch.randn(3, requires_grad=True), torch.randn(3, requires_grad=True)
    h = a.exp()
    loss = (h * b).sum()
    stop = h.grad_fn
    assert autograd_graph.reached_leaves([loss.grad_fn], lambda node, nr: node is stop) == {id(b)}
    assert autograd_graph.reached_leaves([None, loss.grad_fn]) == {id(a), id(b)}
    u = torch.randn(4, requires_grad=True)
    first, second = u.split(2)  # a multi-output node: cutting one output keeps the other path
    loss2 = first.sum() + second.exp().sum()
    cut = autograd_graph.reached_leaves([loss2.grad_fn], lambda node, nr: node is first.grad_fn and nr == 0)
    assert cut == {id(u)}


def test_unchecked_kernel_is_the_checked_ops_kernel():
    g = torch.Generator().manual_seed(0)
    shapes = [(5, 7), (33,)]
    mask = fk.PackedMask.from_bool_stacked([torch.rand(3, *s, generator=g) < 0.5 for s in shapes])
    grads = [torch.randn(s, generator=g) for s in shapes]
    checked = fk.masked_accumulate([torch.zeros(s) for s in shapes], grads, mask, 1)
    acc = [torch.zeros(s) for s in shapes]
    fk.unchecked_kernel("masked_accumulate", "cpu")(acc, grads, mask.words, mask.word_offsets, 1)
    for a, b in zip(acc, checked):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="masked_grad_average"):
        fk.unchecked_kernel("masked_grad_average", "cpu")


def test_task_counts_count_the_tasks_holding_each_entry():
    g = torch.Generator().manual_seed(1)
    bools = [torch.rand(4, 5, 7, generator=g) < 0.3, torch.rand(4, 65, generator=g) < 0.7]
    counts = fk.PackedMask.from_bool_stacked(bools).task_counts()
    for c, b in zip(counts, bools):
        assert c.dtype == torch.int32 and torch.equal(c, b.sum(0, dtype=torch.int32))
