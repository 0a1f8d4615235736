"""Fisher estimation (sum over samples of squared per-sample gradients): ours against the peers.

Peers, each computing ``sum_n (d loss_n / d p)**2`` for every parameter of the model, with
``loss_n = -log p(predicted label of sample n)`` (the ``fs`` score of Eq. 10):

* ``ours``: :func:`fsmtl_kernels.fisher_engine.sum_grad_squared`;
* ``func``: ``torch.func.vmap(torch.func.grad(...))`` per-sample gradients, then square and sum;
* ``opacus``: Opacus ``GradSampleModule`` (``grad_sample`` per parameter), then square and sum;
* ``backpack``: BackPACK's ``SumGradSquared`` extension;
* ``backward``: one plain batched backward of ``sum_n loss_n`` (a floor, not a Fisher).

Models: MLP 784-256-256-10 and a small CNN (Conv 1->16, pool, Conv 16->32, pool, Linear 1568->10)
on 28x28 inputs; 2-layer transformer encoders (``nn.Embedding`` of 1000 tokens +
``nn.TransformerEncoderLayer``, 4 heads, feed-forward 4d) with d = 64 / 256 and sequences of 32 /
128 tokens (``enc-d<d>-L<L>``); and Hugging Face BERT-, ViT- and GPT-2-shaped models built from
their configs (2 layers, width 128, 2 heads, feed-forward 512, vocabulary 1000, 64 tokens or 8x8
patches of 32x32 images; random weights, no download). N = 32, 128, 512. Time: median wall time
of repeated calls (at least 3; fewer than ``--quick``/20 where ``--budget-s`` says so). Memory: the
peak of torch's CPU allocations during one call above what was allocated before it, summed from
the ``[memory]`` events of ``torch.profiler`` (``profile_memory=True``); Python objects are not
counted. Each peer's result is checked against ours before timing; a peer that cannot run a model
(no rule for a layer, a forward vmap cannot batch, per-sample gradients beyond
``--max-per-sample-gb``) is reported with the reason.

Run: ``OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE python benchmarks/fisher_engine_table.py``
(``--quick`` for fewer repeats, ``--models``/``--sizes``/``--methods`` for a subset, ``--threads``).
Where other processes share the cores, OpenMP's default spin-waiting makes multi-thread runs
10-60x slower and erratic (measured here: MLP N=128 backward 1.2 ms -> 107 ms at load 4 with 2
threads); ``OMP_WAIT_POLICY=PASSIVE`` avoids that. The 1-minute load is recorded with every row.
Writes ``benchmarks/results/fisher_engine_t<threads>.json``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from fsmtl_kernels.fisher_engine import sum_grad_squared

METHODS = ("ours", "func", "opacus", "backpack", "backward")
LABELS = {
    "ours": "ours (sum_grad_squared)",
    "func": "torch.func vmap(grad) + square",
    "opacus": "Opacus GradSampleModule + square",
    "backpack": "BackPACK SumGradSquared",
    "backward": "one batched backward (floor)",
}
SIZES = (32, 128, 512)


ENCODERS = {  # name: (width d, sequence length L)
    "enc-d64-L32": (64, 32),
    "enc-d64-L128": (64, 128),
    "enc-d256-L32": (256, 32),
    "enc-d256-L128": (256, 128),
}
HF_MODELS = ("bert", "vit", "gpt2")
MODELS = ("mlp", "cnn", *ENCODERS, *HF_MODELS)
VOCAB = 1000
HF_WIDTH, HF_LENGTH = 128, 64


class Encoder(nn.Module):
    """``nn.Embedding`` + 2 ``nn.TransformerEncoderLayer`` (4 heads, feed-forward 4d, batch_first,
    dropout 0) + mean over positions + ``Linear(d, 10)``."""

    def __init__(self, d: int, length: int):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, d)
        layer = nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(d, 10)

    def forward(self, tokens):
        return self.head(self.enc(self.emb(tokens)).mean(1))


class HFClassifier(nn.Module):
    """A Hugging Face model built from its config (random weights, no download), its first
    position's features and ``Linear(d, 10)``."""

    def __init__(self, kind: str):
        super().__init__()
        import transformers

        common = {"num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 4 * HF_WIDTH}
        off = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}  # dropout off in every method
        if kind == "bert":
            config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=HF_WIDTH, **common, **off)
            self.model = transformers.BertModel(config, add_pooling_layer=False)  # the head reads [CLS]
        elif kind == "vit":
            config = transformers.ViTConfig(
                image_size=32, patch_size=4, num_channels=3, hidden_size=HF_WIDTH, **common, **off
            )
            self.model = transformers.ViTModel(config, add_pooling_layer=False)
        else:
            config = transformers.GPT2Config(
                vocab_size=VOCAB,
                n_embd=HF_WIDTH,
                n_layer=2,
                n_head=2,
                n_positions=128,
                bos_token_id=0,
                eos_token_id=0,
                resid_pdrop=0.0,
                embd_pdrop=0.0,
                attn_pdrop=0.0,
            )
            self.model = transformers.GPT2Model(config)
        self.input_name = "pixel_values" if kind == "vit" else "input_ids"
        self.head = nn.Linear(HF_WIDTH, 10)

    def forward(self, x):
        return self.head(self.model(**{self.input_name: x}).last_hidden_state[:, 0])


def make_model(kind: str) -> nn.Module:
    if kind == "mlp":
        return nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    if kind == "cnn":
        return nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 7 * 7, 10),
        )
    if kind in ENCODERS:
        return Encoder(*ENCODERS[kind])
    if kind in HF_MODELS:
        return HFClassifier(kind)
    raise ValueError(f"model kind {kind!r} is not one of {MODELS}")


def make_input(kind: str, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(n)
    if kind in ENCODERS:
        return torch.randint(0, VOCAB, (n, ENCODERS[kind][1]), generator=g)
    if kind in ("bert", "gpt2"):
        return torch.randint(0, VOCAB, (n, HF_LENGTH), generator=g)
    shape = {"mlp": (n, 784), "cnn": (n, 1, 28, 28), "vit": (n, 3, 32, 32)}[kind]
    return torch.randn(shape, generator=g)


def nll_predicted(logits: torch.Tensor) -> torch.Tensor:
    """Per-sample ``-log p(argmax)``: the loss whose squared gradients every method sums."""
    logp = logits.log_softmax(-1)
    return -logp.gather(-1, logp.argmax(-1, keepdim=True)).squeeze(-1)


def unavailable_reason(method: str) -> str | None:
    """Why a peer cannot run here, or None."""
    try:
        if method == "opacus":
            from opacus import GradSampleModule  # noqa: F401
        elif method == "backpack":
            from backpack import extend  # noqa: F401
            from backpack.extensions import SumGradSquared  # noqa: F401
    except Exception as exc:  # any import failure (missing package, broken torchvision) skips the peer
        return f"{method} cannot be imported: {type(exc).__name__}: {exc}"
    return None


def setup(method: str, model: nn.Module, x: torch.Tensor) -> Callable[[], dict[str, torch.Tensor]]:
    """A callable that computes the Fisher of every parameter of ``model`` on ``x``, by name."""
    names = [k for k, _ in model.named_parameters()]
    params = [p for p in model.parameters()]
    if method == "ours":
        return lambda: dict(zip(names, sum_grad_squared(model, lambda: nll_predicted(model(x)))))
    if method == "backward":

        def backward():
            return list(torch.autograd.grad(nll_predicted(model(x)).sum(), params, allow_unused=True))

        return backward
    if method == "func":
        from torch.func import functional_call, grad, vmap

        named = {k: p.detach() for k, p in model.named_parameters()}

        def loss_one(p, xi):
            return nll_predicted(functional_call(model, p, (xi.unsqueeze(0),)))[0]

        per_sample = vmap(grad(loss_one), in_dims=(None, 0))

        def func():
            grads = per_sample(named, x)
            return {k: grads[k].square().sum(0) for k in named}

        return func
    if method == "opacus":
        from opacus import GradSampleModule
        from opacus.validators import ModuleValidator

        # nn.MultiheadAttention becomes Opacus's DPMultiheadAttention (same function, Linear projections),
        # given the same weights. Opacus records activations in train mode only (no dropout, no BatchNorm).
        gsm = GradSampleModule(_opacus_fixed(model, ModuleValidator), loss_reduction="sum").train()
        gsm_params = list(gsm._module.named_parameters())

        def opacus():
            nll_predicted(gsm(x)).sum().backward()
            fisher = {k: p.grad_sample.square().sum(0) for k, p in gsm_params}
            gsm.zero_grad(set_to_none=True)  # also drops grad_sample, which would accumulate
            return fisher

        return opacus
    if method == "backpack":
        from backpack import backpack, extend
        from backpack.extensions import SumGradSquared

        bp_model = extend(copy.deepcopy(model))
        bp_params = list(bp_model.named_parameters())
        loss_fn = extend(nn.CrossEntropyLoss(reduction="sum"))

        def backpack_sgs():
            logits = bp_model(x)
            loss = loss_fn(logits, logits.argmax(-1).detach())
            with backpack(SumGradSquared()):
                loss.backward()
            missing = sorted(
                {
                    type(m).__name__
                    for m in bp_model.modules()
                    for p in m._parameters.values()
                    if p is not None and not hasattr(p, "sum_grad_squared")
                }
            )
            if missing:
                raise PeerDoesNotApply(f"BackPACK has no SumGradSquared for {', '.join(missing)}")
            fisher = {k: p.sum_grad_squared for k, p in bp_params}
            for _, p in bp_params:
                p.grad = None
                del p.sum_grad_squared
            return fisher

        return backpack_sgs
    raise ValueError(f"unknown method {method!r}")


class PeerDoesNotApply(Exception):
    """A peer that cannot compute this model's Fisher; its row says why instead of a time."""


def _opacus_fixed(model: nn.Module, validator) -> nn.Module:
    """``ModuleValidator.fix`` of a copy, each DPMultiheadAttention given its original's weights."""
    fixed = validator.fix(copy.deepcopy(model))
    originals = dict(model.named_modules())
    with torch.no_grad():
        for name, m in fixed.named_modules():
            if type(m).__name__ != "DPMultiheadAttention":
                continue
            orig = originals[name]
            for i, lin in enumerate((m.qlinear, m.klinear, m.vlinear)):
                rows = slice(i * orig.embed_dim, (i + 1) * orig.embed_dim)
                lin.weight.copy_(orig.in_proj_weight[rows])
                lin.bias.copy_(orig.in_proj_bias[rows])
            m.out_proj.weight.copy_(orig.out_proj.weight)
            m.out_proj.bias.copy_(orig.out_proj.bias)
    return fixed


def median_ms(fns: dict[str, Callable], repeats: dict[str, int]) -> dict[str, float]:
    """Median wall time of each callable (already warmed up), timed round-robin so that load on a
    shared machine hits every method alike."""
    times: dict[str, list[float]] = {m: [] for m in fns}
    for r in range(max(repeats.values())):
        for m, fn in fns.items():
            if r < repeats[m]:
                t0 = time.perf_counter()
                fn()
                times[m].append((time.perf_counter() - t0) * 1e3)
    return {m: statistics.median(t) for m, t in times.items()}


def peak_alloc_mb(fn: Callable) -> float:
    """Peak torch CPU allocation during ``fn()`` above the level before it, from profiler events."""
    fn()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    del result
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    level = peak = 0
    for _, nbytes in events:
        level += nbytes
        peak = max(peak, level)
    return peak / 2**20


def disagreements(reference: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> dict[str, float]:
    """Parameters (present in both, by name) where ``other`` is not within 1e-3 of ours: the largest
    difference relative to the largest entry. A peer that rebuilds a layer (Opacus's
    DPMultiheadAttention) names its parameters otherwise; those are not compared."""
    out = {}
    for k, a in reference.items():
        b = other.get(k)
        if b is None or b.shape != a.shape:
            continue
        scale = float(a.abs().max()) or 1.0
        if not torch.allclose(b, a, rtol=1e-3, atol=1e-4 * scale):
            out[k] = round(float((b - a).abs().max()) / scale, 4)
    return out


def run(
    kinds=("mlp", "cnn"),
    sizes=SIZES,
    repeats: int = 20,
    methods=METHODS,
    budget_s: float = 10.0,
    max_per_sample_gb: float = 3.0,
    memory_max_n: int = 128,
) -> dict:
    """Every method on every (model, N). A method's repeats are at most ``repeats`` and at least 3,
    fewer when its first call shows they would take more than ``budget_s``; per-sample-gradient
    peers whose ``N x P`` gradients exceed ``max_per_sample_gb`` are skipped (named in ``errors``);
    memory is measured for ``N <= memory_max_n``."""
    load_before = os.getloadavg()
    rows = []
    skipped = {m: r for m in methods if (r := unavailable_reason(m)) is not None}
    for kind in kinds:
        for n in sizes:
            torch.manual_seed(0)
            model = make_model(kind).eval()
            x = make_input(kind, n)
            n_params = sum(p.numel() for p in model.parameters())
            fns, first, results, errors, wrong = {}, {}, {}, {}, {}
            for m in methods:
                if m in skipped:
                    continue
                gb = n * n_params * 4 / 2**30
                if m in ("func", "opacus") and gb > max_per_sample_gb:
                    errors[m] = f"per-sample gradients would hold {gb:.1f} GiB (limit {max_per_sample_gb} GiB)"
                    continue
                try:
                    fn = setup(m, model, x)
                    t0 = time.perf_counter()
                    results[m] = fn()  # warm-up: lazy initialisation, allocator caches
                    first[m] = time.perf_counter() - t0
                    fns[m] = fn
                except Exception as exc:  # a peer that does not apply to this model
                    errors[m] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            for m in fns:
                if m not in ("ours", "backward") and "ours" in results:
                    wrong[m] = disagreements(results["ours"], results[m])
            results.clear()
            reps = {m: max(3, min(repeats, int(budget_s / max(first[m], 1e-9)))) for m in fns}
            medians = median_ms(fns, reps)
            load = round(os.getloadavg()[0], 2)
            for m, fn in fns.items():
                rows.append(
                    {
                        "model": kind,
                        "N": n,
                        "params": n_params,
                        "method": m,
                        "median_ms": medians[m],
                        "repeats": reps[m],
                        "peak_mb": peak_alloc_mb(fn) if n <= memory_max_n else None,
                        "load": load,
                        "disagrees": wrong.get(m, {}),
                    }
                )
            for m, reason in errors.items():
                rows.append({"model": kind, "N": n, "params": n_params, "method": m, "error": reason, "load": load})
            print(table({"rows": [r for r in rows if r["model"] == kind and r["N"] == n], "skipped": {}}), flush=True)
    return {
        "rows": rows,
        "skipped": skipped,
        "machine": {
            "cpu": _cpu_name(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
            # other processes on a shared machine distort timings: the 1-minute load before and after
            "load_before": round(load_before[0], 2),
            "load_after": round(os.getloadavg()[0], 2),
        },
        "memory": "peak torch CPU allocation above the level before the call (torch.profiler memory events)",
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def table(report: dict) -> str:
    """One line per (model, N, method): median, its ratio to ours and to one backward, memory, load."""
    lines = [
        "| model | N | method | median ms | reps | / ours | / backward | peak MiB | load |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    timed = {(r["model"], r["N"], r["method"]): r["median_ms"] for r in report["rows"] if "median_ms" in r}
    for r in report["rows"]:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['N']} | {LABELS[r['method']]} | not run: {r['error']} | | | | | |")
            continue
        ours = timed.get((r["model"], r["N"], "ours"))
        floor = timed.get((r["model"], r["N"], "backward"))
        ratio = f"{r['median_ms'] / ours:.2f}" if ours else ""
        to_floor = f"{r['median_ms'] / floor:.2f}" if floor else ""
        peak = f"{r['peak_mb']:.1f}" if r.get("peak_mb") is not None else ""
        if r.get("disagrees"):
            worst = max(r["disagrees"], key=r["disagrees"].get)
            peak += f" (differs from ours on {len(r['disagrees'])} params, {worst}: {r['disagrees'][worst]:.0%})"
        lines.append(
            f"| {r['model']} | {r['N']} | {LABELS[r['method']]} | {r['median_ms']:.1f} | {r['repeats']} | {ratio} | "
            f"{to_floor} | {peak} | {r.get('load', '')} |"
        )
    for m, reason in report["skipped"].items():
        lines.append(f"\nskipped {m}: {reason}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5 repeats instead of 20")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn"], choices=MODELS)
    parser.add_argument("--sizes", nargs="+", type=int, default=list(SIZES))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--budget-s", type=float, default=10.0, help="timed seconds per method and row, about")
    parser.add_argument("--max-per-sample-gb", type=float, default=3.0)
    parser.add_argument("--memory-max-n", type=int, default=128, help="measure memory for N up to this")
    parser.add_argument("--out", help="JSON path (default: benchmarks/results/fisher_engine_t<threads>.json)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    report = run(
        kinds=args.models,
        sizes=args.sizes,
        repeats=5 if args.quick else 20,
        methods=args.methods,
        budget_s=args.budget_s,
        max_per_sample_gb=args.max_per_sample_gb,
        memory_max_n=args.memory_max_n,
    )
    print(table(report))
    m = report["machine"]
    print(
        f"\n{m['cpu']}, torch {m['torch']}, {m['threads']} threads (OMP_WAIT_POLICY={m['omp_wait_policy']}), "
        f"{m['date']}, 1-min load "
        f"{m['load_before']} -> {m['load_after']}; memory: {report['memory']}"
    )
    out = Path(args.out or Path(__file__).parent / "results" / f"fisher_engine_t{args.threads}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
