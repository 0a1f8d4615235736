"""sum_grad_squared on transformer layers against float64 loops of single-sample backward passes.

Every rule the attention models need: ``nn.MultiheadAttention`` (packed and separate projections,
self and cross attention, ``batch_first`` either way, ``add_bias_kv``/``add_zero_attn``, weights
returned or not, padding, causal and float masks), ``nn.TransformerEncoder``/``DecoderLayer``,
attention written with ``nn.Linear`` + ``F.scaled_dot_product_attention`` with rotary and learned
positions, class tokens and layer scales broadcast into the batch, an embedding tied to the output
layer; in every dtype the engine takes; and the fallback (warning once, exact). The reference runs
each sample alone, cut to its true length where it is padded, so padded positions must contribute
exactly nothing.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fsmtl_kernels.fisher_engine import FisherFallbackWarning, sum_grad_squared
from fsmtl_kernels.fisher_engine import engine as engine_mod
from fsmtl_kernels.fisher_engine import fallback as fallback_mod
from fsmtl_kernels.fisher_engine import rules as rules_mod


def nll_predicted(logits: torch.Tensor) -> torch.Tensor:
    """-log p(predicted label) per sample (summed over positions for per-token logits)."""
    logp = logits.log_softmax(-1)
    nll = -logp.gather(-1, logp.argmax(-1, keepdim=True)).squeeze(-1)
    return nll if nll.dim() == 1 else nll.sum(1)


def reference(model: nn.Module, inputs, n: int, dtype=torch.float64) -> list[torch.Tensor]:
    """sum over samples of squared gradients of ``model.trunk``'s parameters, one sample at a time
    in ``dtype``; ``inputs(model, i)`` runs sample ``i`` alone and returns its loss ``[1]``."""
    m = copy.deepcopy(model).to(dtype).eval()
    params = [p for p in m.trunk.parameters() if p.requires_grad]
    fisher = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    for i in range(n):
        grads = torch.autograd.grad(inputs(m, i).sum(), params, allow_unused=True)
        for f, g in zip(fisher, grads, strict=True):
            if g is not None:
                f += g.double().square()
    return fisher


def assert_fisher_close(ours, ref, rtol=2e-4):
    """Each tensor within ``rtol`` of its largest entry (or of a millionth of the largest entry of
    all, for gradients that are zero up to rounding: e.g. a key bias, to which softmax is blind)."""
    top = max(float(r.abs().max()) for r in ref)
    assert len(ours) == len(ref)
    for i, (a, b) in enumerate(zip(ours, ref, strict=True)):
        assert a.dtype == torch.float32 and a.shape == b.shape, i
        atol = rtol * max(float(b.abs().max()), 1e-6 * top)
        torch.testing.assert_close(a.double(), b, rtol=rtol, atol=atol, msg=lambda s, i=i: f"param {i}: {s}")


def fallback_spy(monkeypatch) -> list[tuple[int, ...]]:
    """Shapes of the parameters that take a fallback."""
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


def lengths_mask(n: int, length: int, seed: int) -> torch.Tensor:
    """[n, length] True at padded positions (right padding, at least 2 real positions)."""
    g = torch.Generator().manual_seed(seed)
    real = torch.randint(2, length + 1, (n,), generator=g)
    real[0] = length
    return torch.arange(length)[None] >= real[:, None]


# --------------------------------------------------------------------------- nn.MultiheadAttention
class Attention(nn.Module):
    """x [N, L, E] (and memory [N, S, E]) -> MHA -> mean over real positions -> 3 logits."""

    def __init__(self, cfg: dict):
        super().__init__()
        self.cfg = cfg
        e = 12
        kw = {k: cfg[k] for k in ("bias", "add_bias_kv", "add_zero_attn", "kdim", "vdim") if k in cfg}
        self.trunk = nn.ModuleDict({"attn": nn.MultiheadAttention(e, 3, batch_first=cfg["batch_first"], **kw)})
        self.head = nn.Linear(e, 3)

    def forward(self, x, mem, pad):
        cfg, attn = self.cfg, self.trunk["attn"]
        n, length = x.shape[:2]
        kind = cfg.get("kind", "self")
        key = x if kind == "self" else mem
        value = key if kind in ("self", "cross") else mem.flip(1) * 0.5
        if "kdim" in cfg:
            key, value = key[..., : cfg["kdim"]], value[..., : cfg["vdim"]]
        query = x if kind == "self" else x * 1.5
        kw = {"need_weights": cfg.get("need_weights", False)}
        if cfg.get("padding") and kind == "self":
            kw["key_padding_mask"] = pad
        if cfg.get("causal"):
            kw["attn_mask"] = torch.ones(length, length, dtype=torch.bool).triu(1)
            kw["is_causal"] = True
        if cfg.get("float_mask"):
            g = torch.Generator().manual_seed(5)
            kw["attn_mask"] = (torch.randn(3, length, key.shape[1], generator=g) * 0.3).to(x.dtype).repeat(n, 1, 1)
        if not cfg["batch_first"]:  # sequence first, keeping query is key is value where it holds
            same_kv = key is value
            query, key = query.transpose(0, 1), key.transpose(0, 1)
            value = key if same_kv else value.transpose(0, 1)
            query = key if kind == "self" else query
        out, weights = attn(query, key, value, **kw)
        if not cfg["batch_first"]:
            out = out.transpose(0, 1)
        real = (~pad).to(out.dtype).unsqueeze(-1)
        pooled = (out * real).sum(1) / real.sum(1)
        if weights is not None:  # the returned weights of real query positions enter the loss too
            pooled = pooled + (weights.square() * real).sum((1, 2)).unsqueeze(1)
        return self.head(pooled)


MHA_CASES = {
    "self-packed": {"batch_first": True, "padding": True},
    "self-seq-first": {"batch_first": False, "padding": True},
    "self-weights": {"batch_first": True, "padding": True, "need_weights": True},
    "self-causal": {"batch_first": True, "causal": True},
    "self-causal-padding": {"batch_first": True, "causal": True, "padding": True},
    "self-no-bias-float-mask": {"batch_first": True, "bias": False, "float_mask": True},
    "bias-kv-zero-attn": {"batch_first": True, "padding": True, "add_bias_kv": True, "add_zero_attn": True},
    "cross": {"batch_first": True, "kind": "cross"},
    "cross-seq-first-weights": {"batch_first": False, "kind": "cross", "need_weights": True},
    "distinct-kv": {"batch_first": True, "kind": "distinct"},
    "separate-proj": {"batch_first": True, "kind": "distinct", "kdim": 7, "vdim": 5},
}


def _mha_inputs(n, length, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, length, 12, generator=g).to(dtype)
    mem = torch.randn(n, length + 2, 12, generator=g).to(dtype)
    return x, mem


@pytest.mark.parametrize("case", list(MHA_CASES))
def test_multihead_attention_exact_without_fallback(case, monkeypatch):
    cfg = MHA_CASES[case]
    torch.manual_seed(2)
    model = Attention(cfg)
    n, length = 7, 5
    x, mem = _mha_inputs(n, length)
    pad = lengths_mask(n, length, 3) if cfg.get("padding") else torch.zeros(n, length, dtype=torch.bool)
    spied = fallback_spy(monkeypatch)
    ours = sum_grad_squared(model.trunk, lambda: nll_predicted(model(x, mem, pad)), chunk_size=3)

    def one(m, i):
        dt = next(m.parameters()).dtype
        if cfg.get("padding"):  # the sample alone, without its padding
            keep = int((~pad[i]).sum())
            return nll_predicted(m(x[i : i + 1, :keep].to(dt), mem[i : i + 1].to(dt), pad[i : i + 1, :keep]))
        return nll_predicted(m(x[i : i + 1].to(dt), mem[i : i + 1].to(dt), pad[i : i + 1]))

    assert_fisher_close(ours, reference(model, one, n))
    assert spied == []


@pytest.mark.parametrize("case", ["self-seq-first", "self-weights", "bias-kv-zero-attn", "separate-proj"])
def test_multihead_attention_module_output_unchanged(case):
    """While estimating, the attention module computes what its own forward does."""
    torch.manual_seed(4)
    cfg = MHA_CASES[case]
    model = Attention(cfg).eval()
    x, mem = _mha_inputs(3, 5)
    pad = lengths_mask(3, 5, 1) if cfg.get("padding") else torch.zeros(3, 5, dtype=torch.bool)
    expected = model(x, mem, pad)
    seen = []

    def closure():
        seen.append(model(x, mem, pad))
        return nll_predicted(seen[-1])

    sum_grad_squared(model.trunk, closure)
    torch.testing.assert_close(seen[0], expected, rtol=1e-5, atol=1e-6)
    assert "forward" not in vars(model.trunk["attn"])  # the module's own forward is back


# ------------------------------------------------------------------ nn.Transformer encoder/decoder
class EncoderDecoder(nn.Module):
    def __init__(self, norm_first: bool):
        super().__init__()
        d = 16
        layer = nn.TransformerEncoderLayer(d, 4, 24, dropout=0.2, batch_first=True, norm_first=norm_first)
        self.trunk = nn.ModuleDict(
            {
                "emb": nn.Embedding(20, d, padding_idx=0),
                "pos": nn.Embedding(12, d),
                "enc": nn.TransformerEncoder(layer, 2, enable_nested_tensor=False),
                "dec": nn.TransformerDecoderLayer(d, 2, 20, dropout=0.2, batch_first=True, norm_first=norm_first),
            }
        )
        self.head = nn.Linear(d, 5)

    def forward(self, tokens):
        t = self.trunk
        length = tokens.shape[1]
        pad = tokens == 0
        h = t["emb"](tokens) + t["pos"](torch.arange(length))  # positions [L, d]: no sample dim
        causal = torch.ones(length, length, dtype=torch.bool).triu(1)
        memory = t["enc"](h, mask=causal, src_key_padding_mask=pad, is_causal=True)
        out = t["dec"](h, memory, tgt_mask=causal, tgt_is_causal=True, memory_key_padding_mask=pad)
        real = (~pad).to(out.dtype).unsqueeze(-1)
        return self.head((out * real).sum(1) / real.sum(1))


def _tokens(n, length, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(1, vocab, (n, length), generator=g)
    t[:, 1] = t[:, 0]  # repeated tokens within a sample add before squaring
    t[lengths_mask(n, length, seed)] = 0
    return t


@pytest.mark.parametrize("norm_first", [False, True])
def test_transformer_encoder_decoder_exact_in_eval_mode(norm_first, monkeypatch):
    torch.manual_seed(6)
    model = EncoderDecoder(norm_first).train()  # dropout on: the engine estimates in eval mode
    tokens = _tokens(6, 7, 20, 7)
    spied = fallback_spy(monkeypatch)
    ours = sum_grad_squared(model.trunk, lambda: nll_predicted(model(tokens)), chunk_size=4)
    assert all(m.training for m in model.modules())

    def one(m, i):
        keep = int((tokens[i] != 0).sum())
        return nll_predicted(m(tokens[i : i + 1, :keep]))

    assert_fisher_close(ours, reference(model, one, 6))
    assert spied == []


# ------------------------------------------------ attention from Linear + SDPA, rotary, tied head
def rotary(t: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding of ``[N, H, L, D]`` (no parameters)."""
    length, dim = t.shape[-2], t.shape[-1]
    freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    angle = torch.arange(length, dtype=torch.float64)[:, None] * freq[None]
    cos, sin = angle.cos().to(t.dtype), angle.sin().to(t.dtype)
    a, b = t[..., 0::2], t[..., 1::2]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)


class Decoder(nn.Module):
    """GPT-style: token embedding + learned positions [1, L, d] + class token, pre-RMSNorm, causal
    SDPA on rotary q/k from nn.Linear, layer scale, and an output layer tied to the embedding."""

    def __init__(self, vocab=17, d=12, heads=3, length=8, spare_positions=1):
        super().__init__()
        self.heads = heads
        self.trunk = nn.ModuleDict(
            {
                "emb": nn.Embedding(vocab, d),
                "norm1": nn.RMSNorm(d),
                "qkv": nn.Linear(d, 3 * d),
                "proj": nn.Linear(d, d, bias=False),
                "norm2": nn.LayerNorm(d),
                "fc": nn.Linear(d, 2 * d),
                "out": nn.Linear(2 * d, d),
                "lm": nn.Linear(d, vocab, bias=False),
            }
        )
        t = self.trunk
        t.lm.weight = t.emb.weight  # tied: two modules, one parameter
        t.register_parameter("pos", nn.Parameter(torch.randn(1, length + 1 + spare_positions, d) * 0.3))
        t.register_parameter("cls", nn.Parameter(torch.randn(1, 1, d) * 0.3))
        t.register_parameter("gamma", nn.Parameter(torch.rand(d) + 0.5))

    def forward(self, tokens):
        t, n, length = self.trunk, tokens.shape[0], tokens.shape[1]
        h = torch.cat([t.cls.expand(n, -1, -1), t.emb(tokens)], dim=1) + t.pos[:, : length + 1]
        q, k, v = t.qkv(t.norm1(h)).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(rotary(q), rotary(k), v, is_causal=True)
        h = h + t.gamma * t.proj(a.transpose(1, 2).flatten(2))
        h = h + t.out(F.gelu(t.fc(t.norm2(h))))
        return t.lm(h[:, 1:])  # per-token logits [N, L, vocab]


def test_decoder_with_rotary_positions_class_token_layer_scale_and_tied_head(monkeypatch):
    torch.manual_seed(8)
    model = Decoder()
    tokens = _tokens(9, 8, 17, 9).clamp_min(1)
    spied = fallback_spy(monkeypatch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = sum_grad_squared(model.trunk, lambda: nll_predicted(model(tokens)), chunk_size=4)
    assert_fisher_close(ours, reference(model, lambda m, i: nll_predicted(m(tokens[i : i + 1])), 9))
    # pos[:, :L+1] is a slice (no rule for SliceBackward0): it alone takes the fallback, vmap over
    # the trunk, with a warning naming it; cls (expand), gamma (mul), the tied embedding do not.
    assert spied == [(1, 10, 12)]
    messages = [str(w.message) for w in caught if issubclass(w.category, FisherFallbackWarning)]
    assert len(messages) == 1 and "'pos'" in messages[0] and "SliceBackward0" in messages[0]


def test_tied_embedding_and_broadcast_parameters_exact_without_fallback(monkeypatch):
    """The same decoder with its positional table added whole: no fallback at all."""

    class Whole(Decoder):
        def forward(self, tokens):
            t = self.trunk
            h = torch.cat([t.cls.expand(tokens.shape[0], -1, -1), t.emb(tokens)], dim=1) + t.pos
            h = h + t.gamma * t.proj(t.norm1(h))
            h = h + t.out(F.gelu(t.fc(t.norm2(h))))
            return t.lm(h[:, 1:])

    torch.manual_seed(10)
    model = Whole(spare_positions=0)
    tokens = _tokens(7, 8, 17, 11).clamp_min(1)
    spied = fallback_spy(monkeypatch)
    ours = sum_grad_squared(model.trunk, lambda: nll_predicted(model(tokens)), chunk_size=2)
    assert_fisher_close(ours, reference(model, lambda m, i: nll_predicted(m(tokens[i : i + 1])), 7))
    assert spied == []


# ----------------------------------------------------------------------------------------- dtypes
def assert_within_twice_torchs_error(ours, ref, own):
    """Low precision: our error against float64 at most twice that of torch's own single-sample
    loop at that precision (``own``), plus a thousandth of the tensor's largest entry."""
    for i, (a, b, h) in enumerate(zip(ours, ref, own, strict=True)):
        ours_err = float((a.double() - b).abs().max())
        torch_err = float((h - b).abs().max())
        assert ours_err <= 2 * torch_err + 1e-3 * float(b.abs().max()), (i, ours_err, torch_err)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_every_dtype_the_engine_takes(dtype):
    torch.manual_seed(12)
    model = EncoderDecoder(norm_first=True).eval()
    tokens = _tokens(4, 6, 20, 13)

    def one(m, i):
        keep = int((tokens[i] != 0).sum())
        return nll_predicted(m(tokens[i : i + 1, :keep]).float())

    ref = reference(model, one, 4)
    own = reference(model, one, 4, dtype=dtype) if dtype in (torch.bfloat16, torch.float16) else None
    model = model.to(dtype)
    ours = sum_grad_squared(model.trunk, lambda: nll_predicted(model(tokens).float()))
    if own is None:
        assert_fisher_close(ours, ref, rtol=2e-4 if dtype == torch.float32 else 1e-6)
    else:
        assert_within_twice_torchs_error(ours, ref, own)


def test_attention_in_half_precision_within_twice_torchs_own_error():
    """fp16 attention (packed projections, padding): within twice torch's own fp16 error."""
    torch.manual_seed(14)
    model = Attention(MHA_CASES["self-packed"]).eval()
    x, mem = _mha_inputs(6, 5)
    pad = lengths_mask(6, 5, 3)

    def one(m, i):
        dt = next(m.parameters()).dtype
        return nll_predicted(m(x[i : i + 1].to(dt), mem[i : i + 1].to(dt), pad[i : i + 1]).float())

    ref = reference(model, one, 6)
    torch_half = reference(model, one, 6, dtype=torch.float16)
    model = model.half()
    ours = sum_grad_squared(model.trunk, lambda: nll_predicted(model(x.half(), mem.half(), pad).float()))
    assert_within_twice_torchs_error(ours, ref, torch_half)


# --------------------------------------------------------------------------- blocks and fallbacks
@pytest.mark.parametrize("block", [1, 7, 50])
def test_tiny_blocks_do_not_change_the_result(block, monkeypatch):
    """Per-sample blocks of 1 to 50 entries (rows split, samples one by one, tied sums in blocks)."""
    torch.manual_seed(15)
    model = Decoder()
    tokens = _tokens(5, 8, 17, 16).clamp_min(1)
    expected = sum_grad_squared(model.trunk, lambda: nll_predicted(model(tokens)))
    monkeypatch.setattr(rules_mod, "BLOCK_ELEMENTS", block)
    ours = sum_grad_squared(model.trunk, lambda: nll_predicted(model(tokens)))
    for a, b in zip(ours, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7 * float(b.abs().max()))


class Unbatchable(nn.Module):
    """A module vmap cannot re-run (a Python branch on a tensor value), with a parameter used
    outside any rule, around fused attention: the last fallback (batched backward, math attention)."""

    def __init__(self, d=8):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.scale = nn.Parameter(torch.tensor([0.7, 1.3]))

    def forward(self, h):
        q, k, v = self.qkv(h).unflatten(-1, (3, 2, -1)).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v * self.scale.cumsum(0)[None, :, None, None])
        if float(a.abs().max()) > 1e6:  # data-dependent control flow
            a = a / 2
        return a.transpose(1, 2).flatten(2)


class Pooled(nn.Module):
    def __init__(self, trunk: nn.Module, width: int, classes: int):
        super().__init__()
        self.trunk = trunk
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        return self.head(self.trunk(x).mean(1))


def test_last_fallback_is_exact_and_warns_once(monkeypatch):
    torch.manual_seed(17)
    model = Pooled(nn.Sequential(nn.Linear(4, 8), Unbatchable()), 8, 3)
    x = torch.randn(6, 5, 4)
    spied = fallback_spy(monkeypatch)
    monkeypatch.setattr(engine_mod, "_WARNED", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = sum_grad_squared(model.trunk, lambda: nll_predicted(model(x)))
        again = sum_grad_squared(model.trunk, lambda: nll_predicted(model(x)))
    ref = reference(model, lambda m, i: nll_predicted(m(x[i : i + 1].to(next(m.parameters()).dtype))), 6)
    assert_fisher_close(ours, ref)
    assert_fisher_close(again, ref)
    assert spied == [(2,), (2,), (2,), (2,)]  # per call: vmap tried (and failed), then the graph
    messages = [str(w.message) for w in caught if issubclass(w.category, FisherFallbackWarning)]
    assert len(messages) == 1, messages
    assert "'1.scale'" in messages[0] and "math attention backend" in messages[0] and "vmap" in messages[0]


def test_fallback_reruns_only_the_module_holding_the_parameter():
    """The vmap fallback re-runs the smallest module holding every use of the parameter, on its
    recorded inputs, in chunks: not the whole model (checked by what that module receives)."""
    torch.manual_seed(18)

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(8))
            self.calls = []

        def forward(self, h):
            self.calls.append(tuple(h.shape))
            return h * self.w.exp()  # exp: no broadcast rule reaches w

    model = Pooled(nn.Sequential(nn.Linear(4, 8), nn.GELU(), Scaled(), nn.Linear(8, 8)), 8, 2)
    x = torch.randn(10, 3, 4)
    ref = reference(model, lambda m, i: nll_predicted(m(x[i : i + 1].to(next(m.parameters()).dtype))), 10)
    calls = model.trunk[2].calls
    calls.clear()
    ours = sum_grad_squared(model.trunk, lambda: nll_predicted(model(x)), chunk_size=4)
    assert calls[0] == (10, 3, 8) and calls[1:] == [(1, 3, 8)] * 3  # the batch, then 3 vmapped chunks
    assert_fisher_close(ours, ref)
