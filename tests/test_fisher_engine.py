"""sum_grad_squared against a float64 loop of single-sample backward passes.

The reference copies the model to float64, runs each sample alone (batch of one), and sums the
squared gradients of that sample's loss. Our engine runs the fp32 model on the whole batch, so
agreement is checked at fp32 tolerance relative to each tensor's largest entry.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fsmtl_kernels import available_backends
from fsmtl_kernels.fisher_engine import SUPPORTED_MODULES, sum_grad_squared
from fsmtl_kernels.fisher_engine import fallback as fallback_mod

pytestmark = pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel:UserWarning")


def nll_predicted(logits: torch.Tensor) -> torch.Tensor:
    """-log p(predicted label) per sample (the `fs` score of Eq. 10)."""
    logp = logits.log_softmax(-1)
    return -logp.gather(1, logp.argmax(1, keepdim=True)).squeeze(1)


def reference(model: nn.Module, trunk_name: str, inputs, n: int, params=None):
    """float64 sum over samples of squared gradients of the trunk's params, one sample at a time.

    ``inputs(model, sl)`` runs the forward on samples ``sl`` and returns their per-sample losses.
    ``params`` are names relative to the trunk (default: all with requires_grad).
    """
    m64 = copy.deepcopy(model).double()
    trunk = m64.get_submodule(trunk_name) if trunk_name else m64
    named = dict(trunk.named_parameters())
    names = params if params is not None else [k for k, p in named.items() if p.requires_grad]
    ps = [named[k] for k in names]
    fisher = [torch.zeros_like(p) for p in ps]
    for i in range(n):
        (loss,) = inputs(m64, slice(i, i + 1))
        grads = torch.autograd.grad(loss, ps, allow_unused=True)
        for f, g in zip(fisher, grads, strict=True):
            if g is not None:
                f += g.square()
    return fisher


def assert_fisher_close(ours, ref, rtol=2e-4):
    assert len(ours) == len(ref)
    for i, (a, b) in enumerate(zip(ours, ref, strict=True)):
        assert a.dtype == torch.float32 and a.shape == b.shape, i
        atol = rtol * max(float(b.abs().max()), 1e-30)
        torch.testing.assert_close(a.double(), b, rtol=rtol, atol=atol, msg=lambda s, i=i: f"param {i}: {s}")


def cast(x, dtype):
    return x.to(dtype) if x.is_floating_point() else x


# ------------------------------------------------------------------------------------------ models
class MLP(nn.Module):
    def __init__(self, bias=True):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(13, 31, bias=bias), nn.ReLU(), nn.Linear(31, 17, bias=bias), nn.Tanh())
        self.head = nn.Linear(17, 5, bias=bias)

    def forward(self, x):
        return self.head(self.trunk(x))


class CNN(nn.Module):
    def __init__(self, bias=True):
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv2d(3, 6, 3, stride=2, padding=1, bias=bias),
            nn.BatchNorm2d(6),
            nn.ReLU(),
            nn.Conv2d(6, 8, (3, 2), stride=(1, 2), padding=(2, 0), dilation=(1, 2), groups=2, bias=bias),
            nn.GroupNorm(2, 8),
            nn.Conv2d(8, 4, 3, padding="same", padding_mode="reflect", bias=bias),
            nn.Conv2d(4, 4, 2, padding="same", groups=4, bias=bias),
            nn.Flatten(),
        )
        self.head = nn.Linear(4 * 8 * 2, 3, bias=bias)
        bn = self.trunk[1]
        with torch.no_grad():  # non-trivial running statistics and affine parameters
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        return self.head(self.trunk(x))


class Conv1dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv1d(2, 4, 3, stride=2, padding=2, dilation=2),
            nn.BatchNorm1d(4),
            nn.Tanh(),
            nn.Conv1d(4, 6, 2, groups=2, padding="same", padding_mode="circular"),
            nn.Flatten(),
        )
        self.head = nn.Linear(6 * 10, 3)

    def forward(self, x):
        return self.head(self.trunk(x))


class Block(nn.Module):
    """Embedding + LayerNorm + attention (fallback) + MLP on [N, L, d] + RMSNorm, batch_first."""

    def __init__(self, vocab=11, d=8, length=6, bias=True):
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=0)
        self.pos = nn.Parameter(torch.randn(length, d) * 0.1)  # owned by the block: fallback
        self.ln1 = nn.LayerNorm(d, bias=bias)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True, bias=bias)
        self.ln2 = nn.LayerNorm(d, elementwise_affine=True)
        self.fc1 = nn.Linear(d, 2 * d + 1, bias=bias)
        self.fc2 = nn.Linear(2 * d + 1, d, bias=bias)
        self.norm = nn.RMSNorm(d)

    def forward(self, tokens):
        h = self.emb(tokens) + self.pos
        a = self.ln1(h)
        h = h + self.attn(a, a, a, need_weights=False)[0]
        h = h + self.fc2(F.gelu(self.fc1(self.ln2(h))))
        return self.norm(h)


class Transformer(nn.Module):
    def __init__(self, bias=True):
        super().__init__()
        self.trunk = Block(bias=bias)
        self.head = nn.Linear(8, 4)

    def forward(self, tokens):
        return self.head(self.trunk(tokens).mean(1))


def tokens(n, length=6, vocab=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, vocab, (n, length), generator=g)
    t[:, 1] = t[:, 0]  # repeated tokens within a sample add before squaring
    t[0, :2] = 0  # padding tokens get no gradient
    return t


def run(model, x, trunk="trunk", **kw):
    """Our engine on the whole batch, and the float64 reference."""
    n = x.shape[0]

    def inputs(m, sl):
        return nll_predicted(m(cast(x[sl], next(m.parameters()).dtype)))

    ours = sum_grad_squared(model.get_submodule(trunk), lambda: inputs(model, slice(None)), **kw)
    names = None
    if kw.get("params") is not None:
        lookup = {id(p): k for k, p in model.get_submodule(trunk).named_parameters()}
        names = [lookup[id(p)] for p in kw["params"]]
    return ours, reference(model, trunk, inputs, n, names)


def fallback_spy(monkeypatch):
    """Records the shapes of the parameters that went through a fallback (vmap or batched graph)."""
    shapes = []
    real_vmap, real_graph = fallback_mod.module_vmap, fallback_mod.graph_batched

    def vmap_spy(module, args, kwargs, out_index, grads, params, bufs, *rest):
        shapes.extend(tuple(b.shape) for b in bufs)
        return real_vmap(module, args, kwargs, out_index, grads, params, bufs, *rest)

    def graph_spy(losses, params, bufs, *rest):
        shapes.extend(tuple(b.shape) for b in bufs)
        return real_graph(losses, params, bufs, *rest)

    monkeypatch.setattr(fallback_mod, "module_vmap", vmap_spy)
    monkeypatch.setattr(fallback_mod, "graph_batched", graph_spy)
    return shapes


# ------------------------------------------------------------------------------------- agreement
@pytest.mark.parametrize("bias", [True, False])
def test_mlp_exact_without_fallback(bias, monkeypatch):
    torch.manual_seed(0)
    model = MLP(bias)
    spied = fallback_spy(monkeypatch)
    ours, ref = run(model, torch.randn(23, 13))
    assert_fisher_close(ours, ref)
    assert spied == []


@pytest.mark.parametrize("bias", [True, False])
def test_cnn_exact_with_eval_batchnorm(bias, monkeypatch):
    torch.manual_seed(1)
    model = CNN(bias)
    model.train()  # the engine must switch the trunk to eval (running statistics) and back
    modes = [m.training for m in model.modules()]
    spied = fallback_spy(monkeypatch)
    x = torch.randn(9, 3, 11, 9)
    ours, _ = run(model, x, chunk_size=4)
    assert [m.training for m in model.modules()] == modes
    model.eval()  # the reference in eval mode: same running statistics
    _, ref = run(model, x, chunk_size=4)
    assert_fisher_close(ours, ref)
    assert spied == []


def test_conv1d_exact():
    torch.manual_seed(2)
    model = Conv1dNet().eval()
    ours, ref = run(model, torch.randn(7, 2, 19), chunk_size=3)
    assert_fisher_close(ours, ref)


@pytest.mark.parametrize("bias", [True, False])
def test_transformer_block_exact(bias, monkeypatch):
    torch.manual_seed(3)
    model = Transformer(bias).eval()
    trunk = model.trunk
    spied = fallback_spy(monkeypatch)
    ours, ref = run(model, tokens(10), chunk_size=4)
    assert_fisher_close(ours, ref)
    # attention projections (packed in_proj_weight, functional out_proj) and the positional table
    # added to every sample have rules: nothing takes the fallback
    assert spied == [] and trunk.pos.shape == (6, 8)


def test_norm_layers_multi_dim_shapes(monkeypatch):
    class Norms(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln = nn.LayerNorm([3, 4])
            self.rms = nn.RMSNorm([2, 3, 4], eps=1e-3)
            self.gn = nn.GroupNorm(3, 6)
            self.bn = nn.BatchNorm1d(24).eval()
            with torch.no_grad():
                for p in self.parameters():
                    p.uniform_(0.5, 1.5)
                self.bn.running_mean.uniform_(-1, 1)
                self.bn.running_var.uniform_(0.5, 2)

        def forward(self, x):  # x [N, 2, 3, 4]
            h = torch.tanh(self.rms(self.ln(x)))
            h = self.gn(h.reshape(x.shape[0], 6, 4)).reshape(x.shape[0], 24)
            return self.bn(h)[:, :5]

    torch.manual_seed(17)
    spied = fallback_spy(monkeypatch)
    ours, ref = run(Norms(), torch.randn(7, 2, 3, 4), trunk="")
    assert_fisher_close(ours, ref)
    assert spied == []


def test_embedding_repeated_tokens_and_padding():
    torch.manual_seed(4)
    emb = nn.Embedding(5, 3, padding_idx=2)
    t = torch.tensor([[1, 1, 1, 2], [2, 2, 4, 1], [3, 0, 3, 0]])
    w = torch.randn(4, 3)

    def losses():
        return (emb(t) * w).sum((1, 2)) ** 2

    (ours,) = sum_grad_squared(emb, losses)
    expected = torch.zeros(5, 3, dtype=torch.float64)
    for n in range(3):
        (g,) = torch.autograd.grad(((emb(t[n : n + 1]) * w).sum()) ** 2, emb.weight)
        expected += g.double().square()
    assert expected[2].abs().max() == 0
    torch.testing.assert_close(ours.double(), expected, rtol=1e-5, atol=1e-6)


def test_module_reuse_sums_calls_before_squaring(monkeypatch):
    class Reuse(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(6, 6)
            self.out = nn.Linear(6, 3)

        def forward(self, x):
            return self.out(torch.tanh(self.lin(torch.tanh(self.lin(x)))))

    torch.manual_seed(5)
    model = Reuse()
    spied = fallback_spy(monkeypatch)
    ours, ref = run(model, torch.randn(11, 6), trunk="")
    assert_fisher_close(ours, ref)
    assert spied == []


def test_tied_weights_go_to_fallback(monkeypatch):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(7, 5)
            self.proj = nn.Linear(5, 5)

        def forward(self, t):
            h = torch.tanh(self.proj(self.emb(t))).mean(1)
            return F.linear(h, self.emb.weight)  # output layer tied to the embedding

    torch.manual_seed(6)
    model = Tied()
    spied = fallback_spy(monkeypatch)
    ours, ref = run(model, torch.randint(0, 7, (8, 4)), trunk="")
    assert_fisher_close(ours, ref)
    assert spied == [(7, 5)]


def test_flattened_batch_and_inplace_output():
    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 6)
            self.b = nn.Linear(6, 3)

        def forward(self, x):  # x [N, L, 4]: `a` sees [N*L, 4] (tokens, not samples), then in-place relu
            n = x.shape[0]
            h = F.relu(self.a(x.reshape(-1, 4)), inplace=True)
            return self.b(h.reshape(n, -1, 6).sum(1))

    torch.manual_seed(7)
    ours, ref = run(Flat(), torch.randn(9, 3, 4), trunk="")
    assert_fisher_close(ours, ref)


def test_output_modified_in_place_keeps_rule(monkeypatch):
    torch.manual_seed(15)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(inplace=True), nn.Linear(7, 4), nn.Hardtanh(inplace=True))
    spied = fallback_spy(monkeypatch)
    ours, ref = run(model, torch.randn(8, 5), trunk="")
    assert_fisher_close(ours, ref)
    assert spied == []


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model(dtype):
    """Half-precision models: fp32 buffers, per-sample sums in fp32; error at the model's precision."""
    torch.manual_seed(16)
    model = Transformer().eval()
    x = tokens(6)
    ref = reference(model, "trunk", lambda m, sl: nll_predicted(m(x[sl])), 6)
    model = model.to(dtype)
    ours = sum_grad_squared(model.trunk, lambda: nll_predicted(model(x)).float())
    assert_fisher_close(ours, ref, rtol=0.1)


def test_params_subset_order_out_and_scale():
    torch.manual_seed(8)
    model = Transformer()
    trunk = model.trunk
    x = tokens(6)
    subset = [trunk.fc2.weight, trunk.pos, trunk.emb.weight, trunk.ln1.bias]
    ours, ref = run(model, x, params=subset)
    assert_fisher_close(ours, ref)
    out = [torch.full_like(p, 1.0, dtype=torch.float32) for p in subset]
    result = sum_grad_squared(trunk, lambda: nll_predicted(model(x)), subset, out=out, scale=0.25)
    assert all(r is o for r, o in zip(result, out, strict=True))
    assert_fisher_close([o - 1 for o in out], [0.25 * r for r in ref])


@pytest.mark.parametrize("chunk_size", [1, 3, 100])
def test_chunk_size_does_not_change_result(chunk_size):
    torch.manual_seed(9)
    model = Transformer().eval()
    ours, ref = run(model, tokens(7), chunk_size=chunk_size)
    assert_fisher_close(ours, ref)


def test_float64_model():
    torch.manual_seed(10)
    model = CNN().double().eval()
    ours, ref = run(model, torch.randn(5, 3, 11, 9, dtype=torch.float64))
    assert_fisher_close(ours, ref, rtol=1e-5)


@pytest.mark.parametrize("backend", available_backends("cpu"))
def test_backends_agree(backend):
    torch.manual_seed(11)
    model = MLP()
    ours, ref = run(model, torch.randn(8, 13), backend=backend)
    assert_fisher_close(ours, ref)


def test_grad_untouched_and_kwargs_call():
    torch.manual_seed(12)
    lin = nn.Linear(4, 2)
    lin.weight.grad = torch.full_like(lin.weight, 3.0)
    x = torch.randn(5, 4)
    fw, fb = sum_grad_squared(lin, lambda: lin(input=x).square().sum(1))
    assert torch.equal(lin.weight.grad, torch.full_like(lin.weight, 3.0)) and lin.bias.grad is None
    expected_w = sum((2 * lin(x[n]).detach()[:, None] * x[n][None, :]).square() for n in range(5))
    torch.testing.assert_close(fw, expected_w)


def test_unused_parameters_are_zero():
    torch.manual_seed(13)
    model = nn.ModuleDict({"used": nn.Linear(3, 2), "unused": nn.Linear(3, 2)})
    x = torch.randn(4, 3)
    fw, fb, uw, ub = sum_grad_squared(model, lambda: model["used"](x).sum(1))
    assert uw.abs().max() == 0 and ub.abs().max() == 0 and fb.min() > 0


# ------------------------------------------------------------------------------ BatchNorm and modes
def test_batchnorm_train_mode_rejected_without_eval_mode():
    model = CNN().train()
    x = torch.randn(4, 3, 11, 9)
    with pytest.raises(ValueError, match="eval_mode"):
        sum_grad_squared(model.trunk, lambda: nll_predicted(model(x)), eval_mode=False)
    assert model.trunk.training and not model.trunk._forward_hooks


def test_batchnorm_without_running_stats_rejected():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False))
    with pytest.raises(ValueError, match="batch statistics"):
        sum_grad_squared(model, lambda: model(torch.randn(5, 3)).sum(1))


def test_batchnorm_in_train_mode_outside_module_rejected():
    trunk = nn.Linear(3, 4)
    head = nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 2)).train()
    x = torch.randn(5, 3)
    with pytest.raises(ValueError, match="batch statistics"):
        sum_grad_squared(trunk, lambda: nll_predicted(head(trunk(x))))
    assert not trunk._forward_hooks and head.training
    head.eval()
    sum_grad_squared(trunk, lambda: nll_predicted(head(trunk(x))))


def test_no_grad_forward_in_closure_is_not_reuse(monkeypatch):
    torch.manual_seed(14)
    model = MLP()
    x = torch.randn(9, 13)

    def closure():
        with torch.no_grad():
            labels = model(x).argmax(1)  # a separate pass for the predicted label
        return F.cross_entropy(model(x), labels, reduction="none")

    spied = fallback_spy(monkeypatch)
    ours = sum_grad_squared(model.trunk, closure)
    assert spied == []
    _, ref = run(model, x)
    assert_fisher_close(ours, ref)


def test_eval_mode_false_keeps_modes_and_mixed_modes_restored():
    model = CNN().eval()
    model.trunk[0].train()  # a conv in train mode is harmless; modes must come back exactly
    modes = [m.training for m in model.modules()]
    x = torch.randn(3, 3, 11, 9)
    seen = []

    def closure():
        seen.append(model.trunk[0].training)
        return nll_predicted(model(x))

    sum_grad_squared(model.trunk, closure, eval_mode=False)
    sum_grad_squared(model.trunk, closure)
    assert seen == [True, False]
    assert [m.training for m in model.modules()] == modes


# -------------------------------------------------------------------------------------- bad input
def bad_cases():
    lin = nn.Linear(3, 2)
    other = nn.Linear(3, 2)
    frozen = nn.Linear(3, 2)
    frozen.weight.requires_grad_(False)
    x = torch.randn(4, 3)

    def ok():
        return lin(x).sum(1)

    f32 = [torch.zeros(2, 3), torch.zeros(2)]
    return [
        ((nn.Linear, ok), {}, TypeError, "module"),
        ((lin, "closure"), {}, TypeError, "closure"),
        ((lin, ok, lin.weight), {}, TypeError, "params"),
        ((lin, ok, []), {}, ValueError, "params"),
        ((lin, ok, [other.weight]), {}, ValueError, "params"),
        ((lin, ok, [lin.weight, lin.weight]), {}, ValueError, "params"),
        ((lin, ok, [lin.weight, 3]), {}, TypeError, "params"),
        ((frozen, ok, [frozen.weight]), {}, ValueError, "requires_grad"),
        ((lin, ok), {"out": f32[:1]}, ValueError, "out"),
        ((lin, ok), {"out": [torch.zeros(3, 2), f32[1]]}, ValueError, "out"),
        ((lin, ok), {"out": [f32[0].double(), f32[1]]}, TypeError, "out"),
        ((lin, ok), {"out": f32[0]}, TypeError, "out"),
        ((lin, ok), {"scale": float("nan")}, ValueError, "scale"),
        ((lin, ok), {"scale": "1"}, TypeError, "scale"),
        ((lin, ok), {"scale": True}, TypeError, "scale"),
        ((lin, ok), {"chunk_size": 0}, ValueError, "chunk_size"),
        ((lin, ok), {"chunk_size": 2.0}, TypeError, "chunk_size"),
        ((lin, ok), {"eval_mode": 1}, TypeError, "eval_mode"),
        ((lin, ok), {"backend": "fastest"}, ValueError, "backend"),
        ((lin, lambda: lin(x)), {}, ValueError, "shape"),
        ((lin, lambda: lin(x).sum()), {}, ValueError, "shape"),
        ((lin, lambda: [lin(x).sum(1)]), {}, TypeError, "closure"),
        ((lin, lambda: lin(x).sum(1).detach()), {}, ValueError, "require grad"),
        ((lin, lambda: lin(x).sum(1).long()), {}, TypeError, "dtype"),
    ]


@pytest.mark.parametrize("case", range(len(bad_cases())))
def test_bad_input_names_argument_and_modifies_nothing(case):
    args, kwargs, exc, word = bad_cases()[case]
    out = kwargs.get("out")
    before = [o.clone() for o in out] if isinstance(out, list) else None
    with pytest.raises(exc, match=word):
        sum_grad_squared(*args, **kwargs)
    if before is not None:
        assert all(torch.equal(o, b) for o, b in zip(out, before, strict=True))
    module = args[0]
    if isinstance(module, nn.Module):
        assert not module._forward_hooks and module.weight.grad is None


def test_hooks_removed_and_modes_restored_when_closure_raises():
    model = CNN().train()
    out = [torch.ones_like(p) for p in model.trunk.parameters()]

    def closure():
        model(torch.randn(2, 3, 11, 9))
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        sum_grad_squared(model.trunk, closure, out=out)
    assert all(m.training for m in model.modules())
    assert all(not m._forward_hooks for m in model.modules())
    assert not nn.modules.module._global_forward_hooks
    assert all(torch.equal(o, torch.ones_like(o)) for o in out)
    before = model.trunk[0](torch.randn(1, 3, 5, 5))  # the module still works without hooks
    assert before.shape == (1, 6, 3, 3)


def test_empty_batch_returns_zeros():
    lin = nn.Linear(3, 2)
    fw, fb = sum_grad_squared(lin, lambda: lin(torch.randn(0, 3)).sum(1))
    assert fw.abs().max() == 0 and fb.abs().max() == 0


def test_supported_modules_listed():
    for t in (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding, nn.LayerNorm, nn.GroupNorm, nn.BatchNorm2d):
        assert t in SUPPORTED_MODULES


# ------------------------------------------------------- weights computed from the parameter
def _masked_call(mask):
    """A forward whose first Linear uses ``mask * weight`` through ``functional_call`` (Eq. 3)."""
    from torch.func import functional_call

    def forward(model, x):
        lin = model[0]
        h = functional_call(lin, {"weight": lin.weight * mask.to(lin.weight.dtype)}, (x,))
        return model[2](torch.tanh(h))

    return forward


def test_issue_reproducer_masked_weight_through_functional_call():
    torch.manual_seed(0)
    lin = nn.Linear(3, 2)
    x = torch.randn(4, 3)
    m = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    ours = sum_grad_squared(lin, lambda: functional_call_square(lin, m, x))[0]
    expected = torch.zeros(2, 3, dtype=torch.float64)
    lin64 = copy.deepcopy(lin).double()
    for i in range(4):
        (g,) = torch.autograd.grad(functional_call_square(lin64, m.double(), x[i : i + 1].double()).sum(), lin64.weight)
        expected += g.square()
    assert (ours[m == 0] == 0).all()
    torch.testing.assert_close(ours.double(), expected, rtol=1e-5, atol=1e-7)


def functional_call_square(lin, m, x):
    from torch.func import functional_call

    return functional_call(lin, {"weight": lin.weight * m}, (x,)).square().sum(1)


def _mlp(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4))


def test_masked_forward_matches_single_sample_loop(monkeypatch):
    model = _mlp(21)
    mask = torch.rand(5, 6, generator=torch.Generator().manual_seed(1)) < 0.5
    forward = _masked_call(mask)
    x = torch.randn(10, 6)
    spied = fallback_spy(monkeypatch)
    ours = sum_grad_squared(model, lambda: nll_predicted(forward(model, x)))
    ref = reference(model, "", lambda m, sl: nll_predicted(forward(m, x[sl].to(next(m.parameters()).dtype))), 10)
    assert_fisher_close(ours, ref)
    assert (ours[0][~mask] == 0).all()
    assert spied == [(5, 6)]  # the masked weight goes to the fallback; its bias and layer 2 keep their rules


def test_functional_call_with_the_parameter_itself_keeps_rule(monkeypatch):
    from torch.func import functional_call

    model = _mlp(22)
    x = torch.randn(7, 6)

    def forward(m, xs):
        return functional_call(m, {"0.weight": m[0].weight}, (xs,))

    spied = fallback_spy(monkeypatch)
    ours = sum_grad_squared(model, lambda: nll_predicted(forward(model, x)))
    ref = reference(model, "", lambda m, sl: nll_predicted(forward(m, x[sl].to(next(m.parameters()).dtype))), 7)
    assert_fisher_close(ours, ref)
    assert spied == []


def _reparametrized(kind: str, dtype: torch.dtype) -> nn.Sequential:
    """Three Linear layers, float ``dtype``, with a weight computed from its parameters by ``kind``.

    Built per dtype (not deep-copied: a legacy weight_norm or pruned module holds a non-leaf
    ``weight`` that cannot be copied)."""
    from torch.nn.utils import parametrize, prune
    from torch.nn.utils.parametrizations import weight_norm

    class Symmetric(nn.Module):
        def forward(self, w):
            return w.triu() + w.triu(1).transpose(0, 1)

    torch.manual_seed(23)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 4)).to(dtype)
    if kind == "weight_norm":
        weight_norm(model[0])
    elif kind == "legacy_weight_norm":
        with pytest.warns(FutureWarning):
            torch.nn.utils.weight_norm(model[0])
    elif kind == "parametrize":
        parametrize.register_parametrization(model[2], "weight", Symmetric())
    else:
        prune.l1_unstructured(model[0], "weight", amount=0.5)
        prune.ln_structured(model[2], "weight", amount=0.4, n=2, dim=0)
    return model


@pytest.mark.parametrize("kind", ["weight_norm", "legacy_weight_norm", "parametrize", "prune"])
def test_reparametrized_weights_match_single_sample_loop(kind):
    model, m64 = _reparametrized(kind, torch.float32), _reparametrized(kind, torch.float64)
    x = torch.randn(9, 6, generator=torch.Generator().manual_seed(2))
    ours = sum_grad_squared(model, lambda: nll_predicted(model(x)))
    params = [p for p in m64.parameters() if p.requires_grad]
    ref = [torch.zeros_like(p) for p in params]
    for i in range(9):
        grads = torch.autograd.grad(nll_predicted(m64(x[i : i + 1].double())).sum(), params)
        for f, g in zip(ref, grads, strict=True):
            f += g.square()
    assert_fisher_close(ours, ref)
    if kind == "prune":
        names = [k for k, p in model.named_parameters() if p.requires_grad]
        pruned = ours[names.index("0.weight_orig")][model[0].weight_mask == 0]
        assert pruned.numel() > 0 and (pruned == 0).all()
