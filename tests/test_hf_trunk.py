"""Hugging Face ``transformers`` models as trunks, offline from configs: the Fisher engine exact on
BERT (both attention implementations), GPT-2 (Conv1D, the LM head tied to the token embedding),
ViT and a Llama-shaped decoder (RMSNorm weights and rotary positions) against float64 loops of
single samples cut to their true length (padded positions contribute nothing), with no fallback;
and a tiny BERT trained with FS on a generated token task."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers", reason="transformers is not installed (extra: hf)")

import fsmtl  # noqa: E402
from fsmtl.estimators import task_scores  # noqa: E402
from fsmtl.models import HFTrunk, TokenHead  # noqa: E402
from fsmtl.tasks import Task, task_loss  # noqa: E402
from fsmtl_kernels.fisher_engine import fallback as fallback_mod  # noqa: E402
from fsmtl_kernels.fisher_engine import sum_grad_squared  # noqa: E402

VOCAB, WIDTH = 40, 16


def nll_predicted(logits: torch.Tensor, real: torch.Tensor | None = None) -> torch.Tensor:
    """-log p(predicted label) per sample; per-token logits are summed over ``real`` positions."""
    logp = logits.log_softmax(-1)
    nll = -logp.gather(-1, logp.argmax(-1, keepdim=True)).squeeze(-1)
    if nll.dim() == 1:
        return nll
    return (nll * real.to(nll.dtype)).sum(1)


def padded_tokens(n: int, length: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, length), generator=g)
    real = torch.randint(3, length + 1, (n,), generator=g)
    real[0] = length
    ids[torch.arange(length)[None] >= real[:, None]] = 0
    return ids


def configs():
    small = {"num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 24}
    return {
        "bert-sdpa": (transformers.BertConfig(vocab_size=VOCAB, hidden_size=WIDTH, pad_token_id=0, **small), {}),
        "bert-eager": (
            transformers.BertConfig(vocab_size=VOCAB, hidden_size=WIDTH, pad_token_id=0, **small),
            {"attn_implementation": "eager"},
        ),
        "gpt2": (
            transformers.GPT2Config(
                vocab_size=VOCAB, n_embd=WIDTH, n_layer=2, n_head=2, pad_token_id=0, bos_token_id=1, eos_token_id=1
            ),
            {},
        ),
        "llama": (
            transformers.LlamaConfig(
                vocab_size=VOCAB, hidden_size=WIDTH, pad_token_id=0, bos_token_id=1, eos_token_id=1, **small
            ),
            {},
        ),
    }


class Classifier(nn.Module):
    def __init__(self, trunk: nn.Module, classes: int = 3):
        super().__init__()
        self.trunk = trunk
        self.head = nn.Linear(WIDTH, classes)

    def forward(self, x):
        return self.head(self.trunk(x))


def fisher_and_reference(model: nn.Module, x: torch.Tensor, loss, cut) -> tuple[list, list]:
    """The engine on the batch and the float64 loop over samples ``cut(x, i)``."""
    ours = sum_grad_squared(model.trunk, lambda: loss(model, x))
    m64 = copy.deepcopy(model).double().eval()
    params = [p for p in m64.trunk.parameters() if p.requires_grad]
    ref = [torch.zeros_like(p) for p in params]
    for i in range(x.shape[0]):
        xi = cut(x, i)
        grads = torch.autograd.grad(
            loss(m64, xi.double() if xi.is_floating_point() else xi).sum(), params, allow_unused=True
        )
        for r, g in zip(ref, grads, strict=True):
            if g is not None:  # e.g. BERT's pooler, unused by these heads
                r += g.square()
    return ours, ref


def assert_fisher_close(ours, ref, rtol=2e-4):
    top = max(float(r.abs().max()) for r in ref)
    for i, (a, b) in enumerate(zip(ours, ref, strict=True)):
        atol = rtol * max(float(b.abs().max()), 1e-6 * top)  # some gradients are zero up to rounding
        torch.testing.assert_close(a.double(), b, rtol=rtol, atol=atol, msg=lambda s, i=i: f"param {i}: {s}")


def unpadded(x: torch.Tensor, i: int) -> torch.Tensor:
    return x[i : i + 1, : int((x[i] != 0).sum())]


@pytest.fixture
def no_fallback(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a parameter took the fallback")

    monkeypatch.setattr(fallback_mod, "module_vmap", refuse)
    monkeypatch.setattr(fallback_mod, "graph_batched", refuse)


@pytest.mark.parametrize("name", ["bert-sdpa", "bert-eager", "gpt2", "llama"])
@pytest.mark.parametrize("pooling", ["cls", "mean", "last"])
def test_text_models_exact_with_padding(name, pooling, no_fallback):
    config, kwargs = configs()[name]
    if pooling == "cls" and name != "bert-sdpa":
        pytest.skip("class-token pooling is BERT's")
    torch.manual_seed(0)
    model = Classifier(HFTrunk(transformers.AutoModel.from_config(config, **kwargs), pooling=pooling, pad_token_id=0))
    ours, ref = fisher_and_reference(model, padded_tokens(6, 9, 1), lambda m, x: nll_predicted(m(x)), unpadded)
    assert_fisher_close(ours, ref)


def test_gpt2_lm_head_tied_to_the_token_embedding(no_fallback):
    config, _ = configs()["gpt2"]
    torch.manual_seed(1)
    lm = transformers.GPT2LMHeadModel(config)
    assert lm.lm_head.weight is lm.transformer.wte.weight
    model = nn.Module()
    model.trunk = HFTrunk(lm, pooling="none", pad_token_id=0, output="logits")
    x = padded_tokens(5, 8, 2)

    def loss(m, ids):
        return nll_predicted(m.trunk(ids), ids != 0)

    ours, ref = fisher_and_reference(model, x, loss, unpadded)
    assert_fisher_close(ours, ref)


def test_vit_exact(no_fallback):
    config = transformers.ViTConfig(
        image_size=8, patch_size=4, num_channels=3, hidden_size=WIDTH, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=24,
    )  # fmt: skip
    torch.manual_seed(3)
    model = Classifier(HFTrunk.from_config(config, input_name="pixel_values"))
    x = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    ours, ref = fisher_and_reference(model, x, lambda m, xs: nll_predicted(m(xs)), lambda xs, i: xs[i : i + 1])
    assert_fisher_close(ours, ref)


def test_pooling_ignores_padding():
    config, _ = configs()["bert-sdpa"]
    torch.manual_seed(5)
    x = padded_tokens(4, 7, 6)
    for pooling in ("mean", "last", "none"):
        trunk = HFTrunk.from_config(config, pooling=pooling, pad_token_id=0).eval()
        batch = trunk(x)
        for i in range(4):
            alone = trunk(unpadded(x, i))
            keep = alone.shape[1] if pooling == "none" else None
            torch.testing.assert_close(batch[i : i + 1, :keep] if keep else batch[i : i + 1], alone, atol=1e-5, rtol=0)
    assert trunk.out_features == WIDTH
    with pytest.raises(ValueError, match="pooling"):
        HFTrunk(trunk.model, pooling="max")


def token_benchmark(n: int, length: int, seed: int):
    """Generated token tasks: parity of each token and whether it is >= 20, -1 at padding."""
    x = padded_tokens(n, length, seed)
    pad = x == 0
    parity, high = x % 2, (x >= 20).long()
    parity[pad], high[pad] = -1, -1
    tasks = [Task("parity", "segmentation", 2), Task("high", "segmentation", 2)]
    return tasks, x, [parity[:, None], high[:, None]]


def test_bert_trunk_trains_with_fs_on_a_token_task():
    torch.manual_seed(7)
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
        pad_token_id=0,
    )  # fmt: skip
    tasks, x, ys = token_benchmark(24, 9, 8)
    trunk = HFTrunk.from_config(config, pooling="none", pad_token_id=0)
    model = fsmtl.MultiTaskModel(trunk, [TokenHead(WIDTH, 2) for _ in tasks])
    keep = 0.4
    strategy = fsmtl.FisherSparse(keep, estimator="fs", samples=12, schedule=fsmtl.MaskSchedule(warmup=1, every=1))
    trainer = fsmtl.Trainer(model, tasks, strategy, torch.optim.Adam(model.parameters(), 3e-3), homogeneous=True)
    before = [p.detach().clone() for p in model.masked_parameters()]
    trainer.fit(torch.utils.data.TensorDataset(x, *ys), epochs=2, batch_size=12)
    updates = trainer.history["mask_updates"]
    total = sum(p.numel() for p in model.masked_parameters())
    assert [u["epoch"] for u in updates] == [1]
    assert all(ones == round(keep * total) for u in updates for ones in u["ones"])
    assert any(not torch.equal(p, b) for p, b in zip(model.masked_parameters(), before, strict=True))

    # The trained model's Fisher scores, exact: the padded positions contribute nothing.
    m64 = copy.deepcopy(model).double().eval()
    params = m64.masked_parameters()
    for t, task in enumerate(tasks):
        ours = task_scores(model, t, task, x[:8], ys[t][:8], "fs")
        ref = [torch.zeros_like(p) for p in params]
        for i in range(8):
            keep_len = int((x[i] != 0).sum())
            xi, yi = x[i : i + 1, :keep_len], ys[t][i : i + 1, :, :keep_len]
            loss = task_loss(task, m64(xi, t), yi, reduction="none").sum()
            for r, g in zip(ref, torch.autograd.grad(loss, params, allow_unused=True), strict=True):
                if g is not None:
                    r += g.square() / 8
        assert_fisher_close(ours, ref)
