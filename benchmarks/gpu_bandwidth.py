"""Achieved bandwidth of the Triton kernels on a CUDA GPU, against a device copy and the peers.

For each kernel: median time, bytes it must move, achieved GB/s, the ratio to a device-to-device
copy of the same number of bytes (``dst.copy_(src)``, measured here), and the speed-up over the
peers a user would otherwise run: the eager PyTorch loop (the reference backend) and, for top-K,
``torch.topk`` / ``torch.kthvalue`` on the concatenated scores. Top-K is also reported as a
multiple of one read of the scores (``torch.amax`` over a flat buffer of the same size).

Usage (on a machine with a CUDA GPU)::

    python benchmarks/gpu_bandwidth.py                    # P = 1e7 and 1e8, writes gpu_bandwidth.json
    python benchmarks/gpu_bandwidth.py --sizes 1e7 --json out.json

Targets: Fisher accumulation and masked average >= 80% of copy bandwidth for
P >= 1e7; top-K threshold + mask >= 5x faster than ``torch.topk`` on the concatenated scores at
P = 1e8 (k = 10%, 50%, 90%) and within 3x of one read of the scores.

Without a CUDA device it prints ``no CUDA device; nothing to measure`` and exits with status 0.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
from pathlib import Path

import torch


def median_ms(fn, repeats: int, warmup: int = 3) -> float:
    """Median wall time of ``fn`` in milliseconds, timed with CUDA events around each call."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def split_sizes(total: int) -> list[int]:
    """A model-like list of parameter sizes summing to ``total``: a few large, some odd small ones."""
    small = [1, 7, 1023, 4097, 65_537]
    rest = total - sum(small)
    large = [rest // 2, rest // 4, rest // 8]
    large.append(rest - sum(large))
    return large + small


def copy_gbps(n_bytes: int, device, repeats: int) -> tuple[float, float]:
    """Time (ms) of a device-to-device copy of ``n_bytes`` and its GB/s (bytes read + written)."""
    src = torch.empty(n_bytes // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), repeats)
    return ms, 2 * src.numel() * 4 / ms / 1e6


def row(name: str, p: int, ms: float, n_bytes: int | None, peers: dict[str, float], device, repeats: int) -> dict:
    out = {"kernel": name, "P": p, "ms": round(ms, 4)}
    if n_bytes is not None:
        copy_ms, copy_rate = copy_gbps(n_bytes // 2, device, repeats)  # a copy of n_bytes/2 moves n_bytes
        out.update(
            bytes=n_bytes,
            gbps=round(n_bytes / ms / 1e6, 1),
            copy_gbps=round(copy_rate, 1),
            ratio_to_copy=round(copy_ms / ms, 3),
        )
    for peer, peer_ms in peers.items():
        out[f"{peer}_ms"] = round(peer_ms, 4)
        out[f"speedup_vs_{peer}"] = round(peer_ms / ms, 2)
    return out


def bench_fisher_accumulate(p: int, device, repeats: int, dtype: torch.dtype) -> dict:
    from fsmtl_kernels import reference

    sizes = split_sizes(p)
    grads = [torch.randn(n, device=device, dtype=dtype) for n in sizes]
    fisher = [torch.zeros(n, device=device) for n in sizes]
    ms = median_ms(lambda: torch.ops.fsmtl.fisher_accumulate(fisher, grads, 1.0, False), repeats)
    eager = median_ms(lambda: reference.fisher_accumulate(fisher, grads, 1.0, False), repeats)
    n_bytes = p * (torch.finfo(dtype).bits // 8) + 8 * p  # read g, read + write F
    return row(f"fisher_accumulate[{str(dtype)[6:]}]", p, ms, n_bytes, {"eager_loop": eager}, device, repeats)


def bench_masked_grad_average(p: int, tasks: int, device, repeats: int, dtype: torch.dtype) -> dict:
    import fsmtl_kernels as fk
    from fsmtl_kernels import reference

    sizes = split_sizes(p)
    grads = [torch.randn(tasks, n, device=device, dtype=dtype) for n in sizes]
    mask = fk.PackedMask.from_bool_stacked([torch.rand(tasks, n, device=device) < 0.3 for n in sizes])
    out = [torch.empty(n, device=device, dtype=dtype) for n in sizes]
    ms = median_ms(
        lambda: torch.ops.fsmtl.masked_grad_average(grads, mask.words, mask.word_offsets, "tasks", out), repeats
    )
    eager = median_ms(lambda: reference.masked_grad_average(grads, mask.to_bool_stacked(), "tasks", out), repeats)
    item = torch.finfo(dtype).bits // 8
    n_bytes = tasks * p * item + tasks * mask.words.shape[1] * 4 + p * item
    name = f"masked_grad_average[T={tasks},{str(dtype)[6:]}]"
    return row(name, p, ms, n_bytes, {"eager_loop": eager}, device, repeats)


def bench_topk_mask(p: int, ratio: float, device, repeats: int) -> dict:
    from fsmtl_kernels import reference
    from fsmtl_kernels.packed_mask import word_layout

    sizes = split_sizes(p)
    layout = word_layout(sizes)
    scores = [torch.rand(1, n, device=device) for n in sizes]
    k = int(ratio * p + 0.5)
    ms = median_ms(lambda: torch.ops.fsmtl.topk_mask(scores, [k], *layout), max(3, repeats // 2))
    flat = torch.cat([s.reshape(-1) for s in scores])
    one_read = median_ms(lambda: torch.amax(flat), repeats)
    peers = {
        "torch_topk_cat": median_ms(lambda: torch.topk(torch.cat([s.reshape(-1) for s in scores]), k), 3, warmup=1),
        "torch_kthvalue_cat": median_ms(
            lambda: torch.kthvalue(torch.cat([s.reshape(-1) for s in scores]), p - k + 1), 3, warmup=1
        ),
        "eager_loop": median_ms(lambda: reference.topk_mask(scores, [k], *layout), 3, warmup=1),
    }
    out = row(f"topk_mask[k={ratio:.0%}]", p, ms, None, peers, device, repeats)
    out["one_read_ms"] = round(one_read, 4)
    out["ratio_to_one_read"] = round(ms / one_read, 2)
    return out


def bench_linear_fisher(device, repeats: int, n: int = 4096, n_out: int = 4096, n_in: int = 4096) -> dict:
    from fsmtl_kernels import reference

    g, a = torch.randn(n, n_out, device=device), torch.randn(n, n_in, device=device)
    wf, bf = torch.zeros(n_out, n_in, device=device), torch.zeros(n_out, device=device)
    ms = median_ms(lambda: torch.ops.fsmtl.linear_fisher(g, a, wf, bf, 1.0), repeats)
    eager = median_ms(lambda: reference.linear_fisher(g, a, wf, bf, 1.0), repeats)
    out = row(f"linear_fisher[{n}x{n_out}x{n_in}]", n_out * n_in, ms, None, {"eager_loop": eager}, device, repeats)
    out["tflops"] = round(2 * n * n_out * n_in / ms / 1e9, 2)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", type=float, default=[1e7, 1e8], help="P values (total entries)")
    parser.add_argument("--tasks", type=int, default=3, help="T for the masked average")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per measurement (median reported)")
    parser.add_argument("--json", type=Path, default=Path("gpu_bandwidth.json"), help="where to write the results")
    parser.add_argument(
        "--blocks",
        nargs="*",
        default=[],
        metavar="OP=N",
        help="Triton block sizes to use instead of the defaults (fsmtl_kernels.triton._utils.GPU_BLOCKS), "
        "e.g. average=4096 fisher=4096",
    )
    parser.add_argument("--only", nargs="*", default=[], help="kernels to measure (default: all)")
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print("no CUDA device; nothing to measure")
        return 0
    try:
        from fsmtl_kernels import triton as tb
    except ImportError as exc:
        print(f"the Triton backend cannot be imported ({exc}); install triton to measure it")
        return 1
    device = torch.device("cuda", torch.cuda.current_device())
    reason = tb.unavailable_reason(device)
    if reason is not None:
        print(f"the Triton backend cannot run here: {reason}")
        return 1

    import triton

    from fsmtl_kernels.triton import _utils

    for item in args.blocks:
        op, _, size = item.partition("=")
        if op not in _utils.GPU_BLOCKS or op == "linear" or not size.isdigit():
            parser.error(f"--blocks takes OP=N with OP one of {sorted(set(_utils.GPU_BLOCKS) - {'linear'})}")
        _utils.GPU_BLOCKS[op] = int(size)

    def wanted(name: str) -> bool:
        return not args.only or name in args.only

    rows = []
    for p in (int(s) for s in args.sizes):
        if wanted("fisher_accumulate"):
            rows.append(bench_fisher_accumulate(p, device, args.repeats, torch.float32))
            rows.append(bench_fisher_accumulate(p, device, args.repeats, torch.float16))
        if wanted("masked_grad_average"):
            rows.append(bench_masked_grad_average(p, args.tasks, device, args.repeats, torch.float32))
        for ratio in (0.1, 0.5, 0.9) if wanted("topk_mask") else ():
            rows.append(bench_topk_mask(p, ratio, device, args.repeats))
        torch.cuda.empty_cache()
    if wanted("linear_fisher"):
        rows.append(bench_linear_fisher(device, args.repeats))

    keys = ["kernel", "P", "ms", "gbps", "copy_gbps", "ratio_to_copy", "ratio_to_one_read"]
    print(
        f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, triton {triton.__version__}, "
        f"blocks {_utils.GPU_BLOCKS}"
    )
    print(" | ".join(f"{k:>14}" for k in keys) + " | speed-ups")
    for r in rows:
        speedups = ", ".join(f"{k[11:]}: {v}x" for k, v in r.items() if k.startswith("speedup_vs_"))
        print(" | ".join(f"{str(r.get(k, '')):>14}" for k in keys) + f" | {speedups}")
    result = {
        "device": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "blocks": dict(_utils.GPU_BLOCKS),
        "rows": rows,
    }
    args.json.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
