"""The MPNN trunk of the QM9 benchmark: the same function as PyTorch Geometric's NNConv + GRU +
Set2Set model (weight for weight), its graphs, and exact Fisher scores without a fallback."""

import warnings
from pathlib import Path

import pytest
import torch

from fsmtl.data import load_benchmark
from fsmtl.estimators import task_scores
from fsmtl.model import MultiTaskModel
from fsmtl.models import build_model
from fsmtl.models.mpnn import GRUCell, LSTMCell, MPNNTrunk, molecule_graph
from fsmtl_kernels.fisher_engine.engine import FisherFallbackWarning

pytest.importorskip("rdkit")
pytest.importorskip("pandas")

FIXTURE = str(Path(__file__).parent / "fixtures" / "qm9")


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("qm9-cache"))
    return load_benchmark("qm9", n_train=30, n_val=8, n_test=10, source=FIXTURE, cache_dir=cache)


def test_cells_equal_torch_gru_and_lstm_cells():
    torch.manual_seed(0)
    gru, ref_gru = GRUCell(5, 7).double(), torch.nn.GRUCell(5, 7).double()
    lstm, ref_lstm = LSTMCell(6, 3).double(), torch.nn.LSTMCell(6, 3).double()
    with torch.no_grad():
        for ours, ref in ((gru, ref_gru), (lstm, ref_lstm)):
            ours.ih.weight.copy_(ref.weight_ih), ours.ih.bias.copy_(ref.bias_ih)
            ours.hh.weight.copy_(ref.weight_hh), ours.hh.bias.copy_(ref.bias_hh)
    x, h = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 7, dtype=torch.float64)
    torch.testing.assert_close(gru(x, h), ref_gru(x, h))
    x, h, c = (torch.randn(4, n, dtype=torch.float64) for n in (6, 3, 3))
    for a, b in zip(lstm(x, (h, c)), ref_lstm(x, (h, c))):
        torch.testing.assert_close(a, b)
    bound = 1 / 7**0.5  # torch.nn.GRU's initialisation: uniform in +-1/sqrt(hidden)
    assert all(p.abs().max() <= bound for p in GRUCell(5, 7).parameters())


def test_graphs_of_methane(bench):
    methane = torch.zeros(1, *bench.input_shape)
    columns = torch.tensor([[0, 1, 0, 0, 0, 6, 0, 0, 0, 0, 4]] + [[1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0]] * 4)
    methane[0, :5, :11] = columns
    methane[0, 1:5, 11:14] = torch.eye(4, 3) + 0.5
    methane[0, 0, 15:19] = methane[0, 1:5, 14] = 1.0  # four single C-H bonds
    x, present, src, dst, edge_mask, edge_attr = molecule_graph(methane, "bonded")
    assert x.shape == (1, 5, 11) and present.all() and edge_mask.sum() == 8  # 4 bonds, both ways
    both_ways = [(0, i) for i in range(1, 5)] + [(i, 0) for i in range(1, 5)]
    assert sorted(zip(src[0].tolist(), dst[0].tolist())) == sorted(both_ways)
    assert (edge_attr[0, :, 0] == 1).all() and (edge_attr[0, :, 1:4] == 0).all()
    torch.testing.assert_close(edge_attr[0, 0, 4], torch.tensor(1.5**2 + 0.5**2 + 0.5**2).sqrt())
    _, _, src, dst, edge_mask, edge_attr = molecule_graph(methane, "complete")
    assert edge_mask.sum() == 20 and (src != dst).all()  # every ordered pair of 5 atoms
    assert edge_attr[..., :4].sum() == 8  # bond types on the 8 bonded pairs only; distances on all


@pytest.mark.parametrize("graph", ["bonded", "complete"])
def test_trunk_equals_pytorch_geometric_model(bench, graph):
    pyg = pytest.importorskip("torch_geometric.nn")
    torch.manual_seed(0)
    dim = 8  # the published width is 64 (the default); a narrow trunk keeps the test fast
    ours = MPNNTrunk(dim=dim, graph=graph).double()
    edge_net = torch.nn.Sequential(torch.nn.Linear(5, 128), torch.nn.ReLU(), torch.nn.Linear(128, dim * dim))
    conv, gru = pyg.NNConv(dim, dim, edge_net, aggr="mean").double(), torch.nn.GRU(dim, dim).double()
    set2set, lin0, lin1 = pyg.Set2Set(dim, processing_steps=3).double(), ours.lin0, ours.lin1
    with torch.no_grad():
        edge_net.load_state_dict(ours.edge_net.state_dict())
        conv.lin.weight.copy_(ours.root.weight), conv.bias.copy_(ours.root.bias)
        for cell, ref in ((ours.gru, gru), (ours.set2set.lstm, set2set.lstm)):
            ref.weight_ih_l0.copy_(cell.ih.weight), ref.bias_ih_l0.copy_(cell.ih.bias)
            ref.weight_hh_l0.copy_(cell.hh.weight), ref.bias_hh_l0.copy_(cell.hh.bias)
    inputs = bench.train.inputs[0][:12].double()
    feats, present, src, dst, edge_mask, edge_attr = molecule_graph(inputs, graph)
    n, a = present.shape
    node = torch.full((n, a), -1, dtype=torch.long)
    node[present] = torch.arange(int(present.sum()))
    batch = torch.arange(n).unsqueeze(1).expand(n, a)[present]
    mol = torch.arange(n).unsqueeze(1).expand_as(src)[edge_mask]
    edge_index = torch.stack([node[mol, src[edge_mask]], node[mol, dst[edge_mask]]])
    out = torch.relu(lin0(feats[present]))
    h = out.unsqueeze(0)
    for _ in range(3):
        out, h = gru(torch.relu(conv(out, edge_index, edge_attr[edge_mask])).unsqueeze(0), h)
        out = out.squeeze(0)
    expected = torch.relu(lin1(set2set(out, batch)))
    torch.testing.assert_close(ours(inputs), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("graph", ["bonded", "complete"])
def test_fisher_scores_of_the_trunk_are_exact_without_fallback(bench, graph):
    torch.manual_seed(0)
    trunk = MPNNTrunk(dim=8, graph=graph)
    model = MultiTaskModel(trunk, [torch.nn.Linear(8, 1) for _ in bench.tasks]).double()
    x, y = bench.train.inputs[0][:5].double(), bench.train.targets[3][:5].double()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FisherFallbackWarning)
        scores = task_scores(model, 3, bench.tasks[3], x, y, "fs")
    params = model.masked_parameters()
    expected = [torch.zeros_like(p) for p in params]
    model.eval()
    for i in range(5):
        loss = (model(x[i : i + 1], 3).reshape(()) - y[i]).square()
        for e, g in zip(expected, torch.autograd.grad(loss, params)):
            e += g.square() / 5
    for s, e in zip(scores, expected):
        torch.testing.assert_close(s.double(), e, rtol=1e-5, atol=1e-12)


def test_backbone_choice_and_shape_check(bench):
    model = build_model(bench)
    assert isinstance(model.trunk, MPNNTrunk) and model.trunk.graph == "bonded" and model.trunk.dim == 64
    assert sum(p.numel() for p in model.trunk.parameters()) == 11 * 64 + 64 + 5 * 128 + 128 + 128 * 4096 + 4096 + (
        64 * 64 + 64
    ) + 2 * (64 * 192 + 192) + (128 * 256 + 256 + 64 * 256 + 256) + (128 * 64 + 64)
    assert build_model(bench, backbone="mpnn-complete").trunk.graph == "complete"
    assert len(build_model(bench).heads) == 11
    other = load_benchmark("synthetic", n_samples=40)
    with pytest.raises(ValueError, match="needs packed molecules"):
        build_model(other, backbone="mpnn")
