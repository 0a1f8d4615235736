"""The message-passing network of Nash-MTL's QM9 experiments (PyTorch Geometric's ``examples/qm9_nn_conv.py``
as the shared trunk: NNConv + GRU + Set2Set, width 64), in plain PyTorch over padded molecules.

PyG's model: ``lin0`` (11 -> 64) and ReLU; three rounds of an edge-conditioned convolution
(``NNConv``, Gilmer et al. 2017: the message from atom j to atom i is ``x_j W(e_ij)`` with
``W(e) = reshape(Linear(128, 64*64)(ReLU(Linear(5, 128)(e))))``, averaged over i's incoming
edges, plus a root weight and a bias), ReLU, and one GRU step whose state is the atom vector;
``Set2Set`` pooling (three LSTM steps of attention over the atoms) to 128 values; ``lin1``
(128 -> 64) and ReLU. Each task head is ``Linear(64, 1)``.

Here every layer keeps molecules along dim 0 (``[N, atoms, 64]``, ``[N, edges, ...]``), and the
GRU and LSTM cells are written with ``nn.Linear`` layers. The computation is the same as PyG's
(the test compares them, weight for weight), but every parameter sits in a Linear layer whose
samples are molecules, so the Fisher engine (:func:`fsmtl_kernels.fisher_engine.sum_grad_squared`)
covers the whole trunk with its exact rules (a layer called in each round sums its per-molecule
gradients over the rounds before squaring). The edge network runs once per forward: its output
does not change between the rounds (PyG computes it again in each round, with the same result).

Graphs: ``bonded`` (default; directed edges both ways along the bonds of the input's bond
codes) or ``complete`` (every ordered pair of distinct atoms, as Nash-MTL's ``Complete``
transform). Edge features: the 4 bond-type columns (zero for an unbonded pair) and the
interatomic distance in Angstrom (PyG's ``Distance(norm=False)``), 5 values in both graphs.
Each batch is cut to its largest molecule and its largest edge count; padding atoms and edges
never reach a valid atom (messages are masked, pooling ignores padding atoms).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..data.qm9 import ATOMIC_NUMBER_COLUMN, BOND_COLUMNS, BOND_TYPES, FEATURE_COLUMNS, POSITION_COLUMNS

GRAPHS = ("bonded", "complete")


def _rnn_init(module: nn.Module, hidden: int) -> None:
    """``torch.nn.GRU``/``LSTM``'s initialisation: every weight and bias uniform in +-1/sqrt(hidden)."""
    bound = 1.0 / math.sqrt(hidden)
    for p in module.parameters():
        nn.init.uniform_(p, -bound, bound)


class GRUCell(nn.Module):
    """``torch.nn.GRUCell`` (gates r, z, n in its order) from two Linear layers."""

    def __init__(self, input_size: int, hidden: int) -> None:
        super().__init__()
        self.ih = nn.Linear(input_size, 3 * hidden)
        self.hh = nn.Linear(hidden, 3 * hidden)
        _rnn_init(self, hidden)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        ir, iz, in_ = self.ih(x).chunk(3, -1)
        hr, hz, hn = self.hh(h).chunk(3, -1)
        r = torch.sigmoid(ir + hr)
        z = torch.sigmoid(iz + hz)
        n = torch.tanh(in_ + r * hn)
        return (1 - z) * n + z * h


class LSTMCell(nn.Module):
    """``torch.nn.LSTMCell`` (gates i, f, g, o in its order) from two Linear layers."""

    def __init__(self, input_size: int, hidden: int) -> None:
        super().__init__()
        self.ih = nn.Linear(input_size, 4 * hidden)
        self.hh = nn.Linear(hidden, 4 * hidden)
        _rnn_init(self, hidden)

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        h, c = state
        i, f, g, o = (self.ih(x) + self.hh(h)).chunk(4, -1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c


class Set2Set(nn.Module):
    """PyG's ``Set2Set`` (Vinyals et al. 2016) over padded sets: ``[N, A, d]`` with a mask ``[N, A]`` -> ``[N, 2d]``."""

    def __init__(self, dim: int, steps: int = 3) -> None:
        super().__init__()
        self.dim, self.steps = dim, steps
        self.lstm = LSTMCell(2 * dim, dim)

    def forward(self, x: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        h = x.new_zeros(n, self.dim)
        c = x.new_zeros(n, self.dim)
        q_star = x.new_zeros(n, 2 * self.dim)
        for _ in range(self.steps):
            h, c = self.lstm(q_star, (h, c))
            e = (x * h.unsqueeze(1)).sum(-1).masked_fill(~present, float("-inf"))
            a = torch.softmax(e, dim=1)
            r = (a.unsqueeze(-1) * x).sum(1)
            q_star = torch.cat([h, r], dim=-1)
        return q_star


def molecule_graph(inputs: torch.Tensor, graph: str = "bonded"):
    """Atoms and edges of a batch of packed molecules ``[N, 29, 43]`` (:mod:`fsmtl.data.qm9`), cut
    to the batch's largest molecule ``A`` and largest edge count ``E``.

    Returns ``(x [N, A, 11], present [N, A] bool, src [N, E], dst [N, E], edge_mask [N, E] bool,
    edge_attr [N, E, 5])``; padding edges point at atom 0 and are masked.
    """
    if graph not in GRAPHS:
        raise ValueError(f"graph must be one of {GRAPHS}, got {graph!r}")
    if inputs.dim() != 3 or inputs.shape[-1] != BOND_COLUMNS.stop:
        shape = tuple(inputs.shape)
        raise ValueError(f"MPNN inputs must be packed molecules [N, 29, {BOND_COLUMNS.stop}], got {shape}")
    present_all = inputs[..., ATOMIC_NUMBER_COLUMN] > 0
    a = max(int(present_all.sum(1).max()), 1)
    x = inputs[:, :a, FEATURE_COLUMNS]
    present = present_all[:, :a]
    pos = inputs[:, :a, POSITION_COLUMNS]
    codes = inputs[:, :a, BOND_COLUMNS.start : BOND_COLUMNS.start + a].round().long()
    if graph == "bonded":
        adjacency = codes > 0
    else:
        adjacency = present.unsqueeze(2) & present.unsqueeze(1)
        adjacency &= ~torch.eye(a, dtype=torch.bool, device=inputs.device)
    n = inputs.shape[0]
    mol, i, j = adjacency.nonzero(as_tuple=True)  # edge j -> i (source j, target i); row-major: grouped by molecule
    counts = adjacency.sum((1, 2))
    e = max(int(counts.max()), 1) if n else 1
    start = torch.cumsum(counts, 0) - counts
    slot = torch.arange(mol.numel(), device=inputs.device) - start[mol]
    src = torch.zeros(n, e, dtype=torch.long, device=inputs.device)
    dst = torch.zeros_like(src)
    edge_mask = torch.zeros(n, e, dtype=torch.bool, device=inputs.device)
    src[mol, slot], dst[mol, slot], edge_mask[mol, slot] = j, i, True
    edge_attr = inputs.new_zeros(n, e, len(BOND_TYPES) + 1)
    code = codes[mol, i, j]
    bonded = code > 0
    edge_attr[mol[bonded], slot[bonded], code[bonded] - 1] = 1.0
    edge_attr[mol, slot, len(BOND_TYPES)] = (pos[mol, i] - pos[mol, j]).norm(dim=-1)
    return x, present, src, dst, edge_mask, edge_attr


class MPNNTrunk(nn.Module):
    """Nash-MTL's QM9 trunk (see the module docstring): packed molecules ``[N, 29, 43]`` -> ``[N, dim]``."""

    def __init__(self, num_features: int = 11, dim: int = 64, graph: str = "bonded", rounds: int = 3) -> None:
        super().__init__()
        if graph not in GRAPHS:
            raise ValueError(f"graph must be one of {GRAPHS}, got {graph!r}")
        self.dim, self.graph, self.rounds = dim, graph, rounds
        self.out_features = dim
        self.lin0 = nn.Linear(num_features, dim)
        self.edge_net = nn.Sequential(nn.Linear(len(BOND_TYPES) + 1, 128), nn.ReLU(), nn.Linear(128, dim * dim))
        self.root = nn.Linear(dim, dim)  # NNConv's root weight and bias (PyG: bias initialised to zero)
        nn.init.zeros_(self.root.bias)
        self.gru = GRUCell(dim, dim)
        self.set2set = Set2Set(dim, steps=3)
        self.lin1 = nn.Linear(2 * dim, dim)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x, present, src, dst, edge_mask, edge_attr = molecule_graph(inputs, self.graph)
        n, a = present.shape
        weights = self.edge_net(edge_attr).view(n, src.shape[1], self.dim, self.dim)
        keep = edge_mask.unsqueeze(-1).to(x.dtype)
        incoming = torch.zeros(n, a, dtype=x.dtype, device=x.device).scatter_add_(1, dst, edge_mask.to(x.dtype))
        inv_degree = 1.0 / incoming.clamp(min=1.0).unsqueeze(-1)
        index = dst.unsqueeze(-1).expand(-1, -1, self.dim)
        out = F.relu(self.lin0(x))
        h = out
        for _ in range(self.rounds):
            x_j = out.gather(1, src.unsqueeze(-1).expand(-1, -1, self.dim))
            messages = torch.matmul(x_j.unsqueeze(-2), weights).squeeze(-2) * keep
            mean = torch.zeros_like(out).scatter_add(1, index, messages) * inv_degree
            m = F.relu(mean + self.root(out))
            h = self.gru(m, h)
            out = h
        return F.relu(self.lin1(self.set2set(out, present)))
