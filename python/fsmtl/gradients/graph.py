"""What the autograd graph of a step says about its parameters: which dense parameters reach the
losses only through the boundary below the masks, and which masked Linear weights may take the
fused weight gradient. Both read the graph through :mod:`fsmtl_kernels.autograd_graph`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from fsmtl_kernels import autograd_graph


@dataclass
class Partition:
    """The parameters (and boundary activations) of one masked backward, by how each gets its
    gradient: ``masked`` the masked sum; ``above`` (dense parameters with a path to a loss that
    bypasses the boundary) the task average, task by task; ``heads`` the sum of the task
    gradients; ``below`` (dense parameters reached only through the boundary) one backward of the
    averaged gradient of the boundary activations ``cut``."""

    masked: list[torch.Tensor]
    above: list[torch.Tensor] = field(default_factory=list)
    heads: list[torch.Tensor] = field(default_factory=list)
    below: list[torch.Tensor] = field(default_factory=list)
    cut: list[torch.Tensor] = field(default_factory=list)

    @property
    def others(self) -> list[torch.Tensor]:
        """What is summed task by task besides the masked parameters: ``above + heads + cut``."""
        return self.above + self.heads + self.cut


def partition(
    losses: Sequence[torch.Tensor],
    masked: list[torch.Tensor],
    dense: list[torch.Tensor],
    heads: list[torch.Tensor],
    boundary: Sequence[torch.Tensor],
) -> Partition:
    """The :class:`Partition` of a step: ``dense`` split into ``below`` and ``above`` the boundary.

    A walk of the autograd graph from the losses that stops at the boundary tensors' edges (by
    node and output index, so a multi-output node's other outputs are still followed): a dense
    parameter met on the walk has a path to some loss that bypasses the boundary and stays
    ``above``. Parameters ``below`` get their gradient from the boundary's gradient alone, which
    is then exact (every path from them to a loss crosses the boundary).
    """
    cut = [b for b in boundary if isinstance(b, torch.Tensor) and b.grad_fn is not None]
    if not dense or not cut:
        return Partition(masked, dense, heads)
    stops: dict[torch.autograd.graph.Node, set[int]] = {}
    for b in cut:
        stops.setdefault(b.grad_fn, set()).add(b.output_nr)
    reached = autograd_graph.reached_leaves(
        [loss.grad_fn for loss in losses], lambda node, nr: nr in stops.get(node, ())
    )
    below = [p for p in dense if id(p) not in reached]
    if not below:
        return Partition(masked, dense, heads)
    return Partition(masked, [p for p in dense if id(p) in reached], heads, below, cut)


def fusable_linears(linears, losses, masked) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """The masked ``nn.Linear`` weights of ``linears`` (:attr:`ForwardRecord.linears`) whose task
    gradient is exactly ``G_t^T X`` from the call's input ``X`` and the gradient ``G_t`` of its
    output: index in ``masked`` -> ``(X, output)``. A weight qualifies when its layer was called
    once, on 2-D inputs, its output was not modified in place afterwards, and a walk of the
    autograd graph from the losses finds the weight used only by that call (through its
    transpose): weight tying, a second use, a cast under autocast or a parametrization keep the
    weight on the plain path."""
    calls: dict[int, list] = {}
    for index, x, y, version in linears:
        calls.setdefault(index, []).append((x, y, version))
    candidates = {}
    for index, items in calls.items():
        x, y, version = items[0]
        if len(items) != 1 or y._version != version or x.dim() != 2 or y.dim() != 2 or y.grad_fn is None:
            continue
        if type(y.grad_fn).__name__ in ("AddmmBackward0", "MmBackward0") and x.dtype == y.dtype:
            candidates[index] = (x, y)
    if not candidates:
        return {}
    users: dict[torch.autograd.graph.Node, list] = {}
    leaves = {}
    for node, edges in autograd_graph.walk([loss.grad_fn for loss in losses]):
        leaf = autograd_graph.leaf_tensor(node)
        if leaf is not None:
            leaves[id(leaf)] = node
        for nxt, _ in edges:
            users.setdefault(nxt, []).append(node)
    out = {}
    for index, (x, y) in candidates.items():
        leaf = leaves.get(id(masked[index]))
        through = users.get(leaf, []) if leaf is not None else []
        if len(through) == 1 and type(through[0]).__name__ == "TBackward0" and users.get(through[0]) == [y.grad_fn]:
            out[index] = (x, y)
    return out
