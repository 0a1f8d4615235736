"""Walks of the autograd graph, the one place both the Fisher engine and the masked backward of
``fsmtl`` ask which parameters a loss reaches, and through which nodes.

A graph is walked from the ``grad_fn`` of one or more tensors: :func:`walk` yields every node
reachable from them once, with the edges it follows out of it; an edge can be cut by a predicate
on ``(node, output index)`` (the input of a layer, a boundary activation). Leaves (the
``AccumulateGrad`` nodes of tensors that require grad) are yielded like other nodes, with no
edges; :func:`leaf_tensor` gives their tensor. The order of the walk is unspecified: every helper
built on it returns sets or counts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch

Node = torch.autograd.graph.Node
Edge = tuple[Node, int]


def walk(
    roots: Iterable[Node | None], stop: Callable[[Node, int], bool] | None = None
) -> Iterator[tuple[Node, list[Edge]]]:
    """Every node reachable from ``roots`` (``None`` entries are skipped), once each, as
    ``(node, edges)``: ``edges`` are the ``(next node, its output index)`` pairs followed from
    ``node``; an edge for which ``stop(next node, output index)`` is true is neither followed nor
    listed."""
    seen: set[Node] = set()
    stack = [r for r in roots if r is not None]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        edges = [(n, nr) for n, nr in node.next_functions if n is not None and (stop is None or not stop(n, nr))]
        stack.extend(n for n, _ in edges)
        yield node, edges


def leaf_tensor(node: Node) -> torch.Tensor | None:
    """The tensor an ``AccumulateGrad`` node accumulates into (a leaf that requires grad), or None
    for any other node."""
    return node.variable if type(node).__name__ == "AccumulateGrad" else None


def leaf_uses(root: Node) -> dict[int, int]:
    """For each leaf below ``root``, by ``id()`` of its tensor: how many edges of the graph lead
    to it (1: the tensor is used once in the whole computation)."""
    counts: dict[int, int] = {}
    for _, edges in walk([root]):
        for nxt, _ in edges:
            leaf = leaf_tensor(nxt)
            if leaf is not None:
                counts[id(leaf)] = counts.get(id(leaf), 0) + 1
    return counts


def reached_leaves(roots: Iterable[Node | None], stop: Callable[[Node, int], bool] | None = None) -> set[int]:
    """``id()`` of every leaf tensor reachable from ``roots`` without crossing a stopped edge."""
    return {id(leaf) for node, _ in walk(roots, stop) if (leaf := leaf_tensor(node)) is not None}
