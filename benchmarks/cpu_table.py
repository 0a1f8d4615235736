"""CPU benchmark table: the C++ backend against the peers a user would otherwise run, side by side.

Cases (float32 scores/gradients split over 20 parameter tensors of mixed sizes, P entries in all):

Sections are named by op (``--ops``):

* ``topk_mask``: ``fk.topk_mask(scores, k)`` (threshold + packed mask with exactly k ones) against
  ``torch.topk(torch.cat(scores), k)`` (sorted, the default, and ``sorted=False``),
  ``torch.kthvalue``, ``torch.sort`` and ``numpy.partition`` of the concatenated scores,
  for k = 10%, 50%, 90%. The peers get the concatenation included, as a user would need it; none
  of them builds a mask.
* ``fisher_accumulate``: ``fk.fisher_accumulate`` on per-sample gradients ``[N, *shape]`` (fp32 and fp16)
  against the eager loop ``f.add_(g.float().square().sum(0))`` and ``torch.compile`` of it, and on
  batch gradients against the eager loop and ``torch._foreach_addcmul_``.
* ``masked_grad_average``: ``fk.masked_grad_average`` for T = 3 and 8 against the Python loop over tasks and
  parameters (given unpacked bool masks).
* ``floor``: ``clone()`` of the bytes the op must move: the scores for top-K (as in the issue),
  half of (bytes read + bytes written) for the others, so that the clone moves as many bytes.
  ``clone()`` allocates, so its time includes first-touch page faults; the table also gives the
  ratio to ``copy_`` of the same bytes into a buffer already touched (pure bandwidth).

Run (prints one Markdown table, writes JSON to ``benchmarks/results/``)::

    OMP_NUM_THREADS=2 python benchmarks/cpu_table.py            # P = 1e6, 1e7, 5e7
    OMP_NUM_THREADS=2 python benchmarks/cpu_table.py --sizes 1e6 --out /tmp/x.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

import fsmtl_kernels as fk
from fsmtl_kernels import backends
from fsmtl_kernels.packed_mask import PackedMask, word_layout

SIZES = {"1e6": 1_000_000, "1e7": 10_000_000, "5e7": 50_000_000}
RATIOS = (0.1, 0.5, 0.9)
N_TENSORS = 20
PER_SAMPLE_N = {"1e6": 32, "1e7": 32, "5e7": 4}  # N = 32 at 5e7 would need 6.4 GB of fp32 gradients
TASKS = (3, 8)
RESULTS = Path(__file__).parent / "results"


def split_sizes(total: int, n: int = N_TENSORS, seed: int = 0) -> list[int]:
    """``n`` parameter sizes summing to ``total``: log-uniform weights, bias-like tiny tensors, none a power of two."""
    rng = np.random.default_rng(seed)
    tiny = [7, 123, 1023, 4097]
    weights = np.exp(rng.uniform(0.0, 4.0, n - len(tiny)))
    big = np.floor(weights / weights.sum() * (total - sum(tiny))).astype(np.int64)
    big[0] += total - sum(tiny) - int(big.sum())
    sizes = [int(s) for s in big] + tiny
    rng.shuffle(sizes)
    return sizes


def make_scores(total: int, seed: int = 0) -> list[torch.Tensor]:
    """Fisher-like fp32 scores: squared normals with a per-tensor scale (layers differ by decades)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i, n in enumerate(split_sizes(total, seed=seed)):
        out.append(torch.randn(n, generator=gen).square_().mul_(10.0 ** ((i % 5) - 2)))
    return out


def floor_fn(nbytes: int) -> Callable[[], object]:
    """``clone()`` of ``nbytes`` bytes: the floor the issue defines (it includes allocation and page faults)."""
    buf = torch.empty(max(int(nbytes), 1), dtype=torch.uint8)
    buf.fill_(1)
    return buf.clone


def copy_floor_fn(nbytes: int) -> Callable[[], object]:
    """``copy_`` of ``nbytes`` bytes into a buffer already touched: the stricter, pure-bandwidth floor."""
    src = torch.ones(max(int(nbytes), 1), dtype=torch.uint8)
    dst = torch.zeros_like(src)
    return lambda: dst.copy_(src)


def topk_peers(scores: list[torch.Tensor], k: int) -> dict[str, Callable[[], object]]:
    total = sum(s.numel() for s in scores)
    rows = [s.unsqueeze(0) for s in scores]
    offsets, n_words = word_layout([s.numel() for s in scores])
    return {
        "ours": lambda: fk.topk_mask(scores, k, backend="cpp"),
        # the kernel alone, without the public function's validation (its NaN scan reads the scores once more)
        "ours (kernel only)": lambda: torch.ops.fsmtl.topk_mask(rows, [k], offsets, n_words),
        "torch.topk (sorted)": lambda: torch.topk(torch.cat(scores), k),
        "torch.topk (unsorted)": lambda: torch.topk(torch.cat(scores), k, sorted=False),
        "torch.kthvalue": lambda: torch.kthvalue(torch.cat(scores), total - k + 1),
        "torch.sort": lambda: torch.sort(torch.cat(scores), descending=True),
        "numpy.partition": lambda: np.partition(torch.cat(scores).numpy(), total - k),
    }


def fisher_eager(fisher, grads):
    for f, g in zip(fisher, grads, strict=True):
        f.add_(g.float().square().sum(0))


def fisher_eager_batch(fisher, grads):
    for f, g in zip(fisher, grads, strict=True):
        f.add_(g.float().square())


_compiled_fisher = torch.compile(fisher_eager, dynamic=False)


def fisher_peers(sizes: list[int], n: int | None, dtype: torch.dtype) -> tuple[dict, int]:
    """Implementations of one Fisher case, and the bytes it must move (grads read, Fisher read + written)."""
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(*((n, s) if n else (s,)), generator=gen).to(dtype) for s in sizes]
    fisher = [torch.zeros(s) for s in sizes]
    nbytes = sum(g.numel() * g.element_size() for g in grads) + 8 * sum(sizes)
    if n:
        impls = {
            "ours": lambda: fk.fisher_accumulate(fisher, grads, backend="cpp"),
            "eager loop": lambda: fisher_eager(fisher, grads),
            "torch.compile loop": lambda: _compiled_fisher(fisher, grads),
        }
    else:
        impls = {
            "ours": lambda: fk.fisher_accumulate(fisher, grads, backend="cpp"),
            "eager loop": lambda: fisher_eager_batch(fisher, grads),
        }
        if dtype == torch.float32:
            impls["torch._foreach_addcmul_"] = lambda: torch._foreach_addcmul_(fisher, grads, grads)
    return impls, nbytes


def average_loop(grads, bools, num_tasks):
    out = []
    for g, b in zip(grads, bools, strict=True):
        acc = torch.zeros(g.shape[1:], dtype=torch.float32)
        for t in range(num_tasks):
            acc += g[t].float() * b[t]
        out.append(acc / num_tasks)
    return out


def average_peers(sizes: list[int], num_tasks: int) -> tuple[dict, int]:
    gen = torch.Generator().manual_seed(2)
    grads = [torch.randn(num_tasks, s, generator=gen) for s in sizes]
    bools = [torch.rand(num_tasks, s, generator=gen) < 0.5 for s in sizes]
    mask = PackedMask.from_bool_stacked(bools)
    total = sum(sizes)
    nbytes = num_tasks * total * 4 + mask.words.numel() * 4 + total * 4
    return {
        "ours": lambda: fk.masked_grad_average(grads, mask, backend="cpp"),
        "python loop": lambda: average_loop(grads, bools, num_tasks),
    }, nbytes


def median_ms(fn: Callable[[], object], rounds: int) -> float:
    fn()  # warm-up: lazy initialisation and torch.compile stay out of the timing
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def rounds_for(total: int, slow: bool) -> int:
    if total >= 50_000_000:
        return 3 if slow else 5
    if total >= 10_000_000:
        return 5 if slow else 9
    return 15


SLOW = {"torch.topk (sorted)", "torch.sort", "torch.kthvalue", "torch.topk (unsorted)", "python loop", "eager loop"}


def run_group(rows: list[dict], op: str, case: str, size: str, impls: dict, floor_bytes: int) -> None:
    total = SIZES[size]
    times = {name: median_ms(fn, rounds_for(total, name in SLOW)) for name, fn in impls.items()}
    floor = median_ms(floor_fn(floor_bytes), rounds_for(total, False))
    copy = median_ms(copy_floor_fn(floor_bytes), rounds_for(total, False))
    for name, ms in times.items():
        rows.append(
            {
                "op": op,
                "case": case,
                "P": size,
                "impl": name,
                "median_ms": round(ms, 3),
                "ours_speedup": round(ms / times["ours"], 2),
                "ratio_to_floor": round(ms / floor, 2),
                "floor_ms": round(floor, 3),
                "ratio_to_copy": round(ms / copy, 2),
                "copy_ms": round(copy, 3),
            }
        )
    print(f"  {op} {case} P={size}: " + ", ".join(f"{n} {t:.1f} ms" for n, t in times.items()), file=sys.stderr)


def collect(sizes: list[str], ops: list[str]) -> list[dict]:
    rows: list[dict] = []
    for size in sizes:
        total = SIZES[size]
        parts = split_sizes(total)
        if "topk_mask" in ops:
            scores = make_scores(total)
            for ratio in RATIOS:
                k = fk.resolve_k(ratio, total)
                run_group(rows, "topk_mask", f"k={ratio:.0%}", size, topk_peers(scores, k), 4 * total)
            del scores
        if "fisher_accumulate" in ops:
            n = PER_SAMPLE_N[size]
            for dtype in (torch.float32, torch.float16):
                impls, nbytes = fisher_peers(parts, n, dtype)
                run_group(rows, "fisher_accumulate", f"per-sample N={n} {str(dtype)[6:]}", size, impls, nbytes // 2)
                del impls
            impls, nbytes = fisher_peers(parts, None, torch.float32)
            run_group(rows, "fisher_accumulate", "batch float32", size, impls, nbytes // 2)
            del impls
        if "masked_grad_average" in ops:
            for num_tasks in TASKS:
                impls, nbytes = average_peers(parts, num_tasks)
                run_group(rows, "masked_grad_average", f"T={num_tasks}", size, impls, nbytes // 2)
                del impls
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| op | case | P | implementation | median ms | ours is x faster | time / clone floor | time / copy_ floor |",
        "|---|---|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        speed = "—" if r["impl"] == "ours" else f"{r['ours_speedup']:.2f}"
        lines.append(
            f"| {r['op']} | {r['case']} | {r['P']} | {r['impl']} | {r['median_ms']:.1f} | {speed} | "
            f"{r['ratio_to_floor']:.2f} | {r['ratio_to_copy']:.2f} |"
        )
    return "\n".join(lines)


def machine() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cores_visible": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    ops = ["topk_mask", "fisher_accumulate", "masked_grad_average"]
    parser.add_argument("--ops", nargs="+", default=ops, choices=ops)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/cpu-<date>.json)")
    args = parser.parse_args(argv)
    reason = backends.unavailable_reason("cpp", torch.device("cpu"))
    if reason is not None:
        raise SystemExit(f"the C++ backend is not available: {reason}")
    torch.set_num_threads(args.threads)
    info = machine()
    rows = collect(args.sizes, args.ops)
    table = markdown(rows)
    print(
        f"CPU: {info['cpu']}, {info['torch_threads']} threads, torch {info['torch']}, numpy {info['numpy']}, "
        f"{info['date']}\n"
    )
    print(table)
    out = args.out or RESULTS / f"cpu-{datetime.date.today().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": info, "rows": rows}, indent=1) + "\n")
    print(f"\nwrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
