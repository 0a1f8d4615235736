"""Fisher estimation (sum over samples of squared per-sample gradients): ours against the peers.

Peers, each computing ``sum_n (d loss_n / d p)**2`` for every parameter of the model, with
``loss_n = -log p(predicted label of sample n)`` (the ``fs`` score of Eq. 10):

* ``ours``: :func:`fsmtl_kernels.fisher_engine.sum_grad_squared`;
* ``func``: ``torch.func.vmap(torch.func.grad(...))`` per-sample gradients, then square and sum;
* ``opacus``: Opacus ``GradSampleModule`` (``grad_sample`` per parameter), then square and sum;
* ``backpack``: BackPACK's ``SumGradSquared`` extension;
* ``backward``: one plain batched backward of ``sum_n loss_n`` (a floor, not a Fisher).

Models: MLP 784-256-256-10 and a small CNN (Conv 1->16, pool, Conv 16->32, pool, Linear 1568->10)
on 28x28 inputs, N = 32, 128, 512. Time: median wall time of repeated calls. Memory: the peak of
torch's CPU allocations during one call above what was allocated before it, summed from the
``[memory]`` events of ``torch.profiler`` (``profile_memory=True``); Python objects are not
counted. Each peer's result is checked against ours before timing.

Run: ``OMP_NUM_THREADS=2 OMP_WAIT_POLICY=PASSIVE python benchmarks/fisher_engine_table.py``
(``--quick`` for fewer repeats, ``--models``/``--sizes`` for a subset). Where other processes share the
cores, OpenMP's default spin-waiting makes 2-thread runs 10-60x slower and erratic (measured here:
MLP N=128 backward 1.2 ms -> 107 ms at load 4); ``OMP_WAIT_POLICY=PASSIVE`` avoids that.
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
    raise ValueError(f"model kind {kind!r} is not 'mlp' or 'cnn'")


def make_input(kind: str, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(n)
    shape = (n, 784) if kind == "mlp" else (n, 1, 28, 28)
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


def setup(method: str, model: nn.Module, x: torch.Tensor) -> Callable[[], list[torch.Tensor]]:
    """A callable that computes the Fisher of every parameter of ``model`` on ``x``."""
    params = [p for p in model.parameters()]
    if method == "ours":
        return lambda: sum_grad_squared(model, lambda: nll_predicted(model(x)))
    if method == "backward":

        def backward():
            return list(torch.autograd.grad(nll_predicted(model(x)).sum(), params))

        return backward
    if method == "func":
        from torch.func import functional_call, grad, vmap

        named = {k: p.detach() for k, p in model.named_parameters()}

        def loss_one(p, xi):
            return nll_predicted(functional_call(model, p, (xi.unsqueeze(0),)))[0]

        per_sample = vmap(grad(loss_one), in_dims=(None, 0))

        def func():
            grads = per_sample(named, x)
            return [grads[k].square().sum(0) for k in named]

        return func
    if method == "opacus":
        from opacus import GradSampleModule

        gsm = GradSampleModule(copy.deepcopy(model), loss_reduction="sum")
        gsm_params = list(gsm.parameters())

        def opacus():
            nll_predicted(gsm(x)).sum().backward()
            fisher = [p.grad_sample.square().sum(0) for p in gsm_params]
            gsm.zero_grad(set_to_none=True)  # also drops grad_sample, which would accumulate
            return fisher

        return opacus
    if method == "backpack":
        from backpack import backpack, extend
        from backpack.extensions import SumGradSquared

        bp_model = extend(copy.deepcopy(model))
        bp_params = list(bp_model.parameters())
        loss_fn = extend(nn.CrossEntropyLoss(reduction="sum"))

        def backpack_sgs():
            logits = bp_model(x)
            loss = loss_fn(logits, logits.argmax(-1).detach())
            with backpack(SumGradSquared()):
                loss.backward()
            fisher = [p.sum_grad_squared for p in bp_params]
            for p in bp_params:
                p.grad = None
                del p.sum_grad_squared
            return fisher

        return backpack_sgs
    raise ValueError(f"unknown method {method!r}")


def median_ms(fns: dict[str, Callable], repeats: dict[str, int]) -> dict[str, float]:
    """Median wall time of each callable, timed round-robin so that load on a shared machine
    hits every method alike."""
    for fn in fns.values():
        fn()  # warm-up: lazy initialisation, allocator caches
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


def check_agreement(reference: list[torch.Tensor], other: list[torch.Tensor], method: str) -> None:
    for i, (a, b) in enumerate(zip(reference, other, strict=True)):
        scale = float(a.abs().max()) or 1.0
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4 * scale, msg=lambda s, i=i: f"{method}, param {i}: {s}")


def run(kinds=("mlp", "cnn"), sizes=SIZES, repeats: int = 20, methods=METHODS) -> dict:
    load_before = os.getloadavg()
    rows = []
    skipped = {m: r for m in methods if (r := unavailable_reason(m)) is not None}
    for kind in kinds:
        for n in sizes:
            torch.manual_seed(0)
            model = make_model(kind)
            x = make_input(kind, n)
            n_params = sum(p.numel() for p in model.parameters())
            fns = {m: setup(m, model, x) for m in methods if m not in skipped}
            reference = fns["ours"]()
            for m, fn in fns.items():
                if m != "backward":
                    check_agreement(reference, fn(), m)
            # the slowest peer takes ~1 s a call at N=512: fewer repeats keep the run short
            reps = {m: max(3, repeats // 4) if (m in ("func", "opacus") and n >= 512) else repeats for m in fns}
            medians = median_ms(fns, reps)
            for m, fn in fns.items():
                rows.append(
                    {
                        "model": kind,
                        "N": n,
                        "params": n_params,
                        "method": m,
                        "median_ms": medians[m],
                        "repeats": reps[m],
                        "peak_mb": peak_alloc_mb(fn),
                    }
                )
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
    lines = [
        "| model | N | method | median ms | x vs ours | peak MiB |",
        "|---|---:|---|---:|---:|---:|",
    ]
    ours = {(r["model"], r["N"]): r["median_ms"] for r in report["rows"] if r["method"] == "ours"}
    for r in report["rows"]:
        ratio = r["median_ms"] / ours[(r["model"], r["N"])]
        lines.append(
            f"| {r['model']} | {r['N']} | {LABELS[r['method']]} | {r['median_ms']:.2f} | {ratio:.2f} | "
            f"{r['peak_mb']:.1f} |"
        )
    for m, reason in report["skipped"].items():
        lines.append(f"\nskipped {m}: {reason}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5 repeats instead of 20")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn"], choices=["mlp", "cnn"])
    parser.add_argument("--sizes", nargs="+", type=int, default=list(SIZES))
    parser.add_argument("--out", help="JSON path (default: benchmarks/results/fisher_engine_t<threads>.json)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    report = run(kinds=args.models, sizes=args.sizes, repeats=5 if args.quick else 20)
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
