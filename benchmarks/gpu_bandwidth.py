"""Achieved bandwidth of the Triton kernels on a CUDA GPU, against a device copy and the peers.

For each kernel: median time, bytes it must move, achieved GB/s, the ratio to a device-to-device
copy of the same number of bytes (``dst.copy_(src)``, measured here), and the speed-up over the
peers a user would otherwise run: the eager PyTorch loop (the reference backend) and, for top-K,
``torch.topk`` / ``torch.kthvalue`` on the concatenated scores. Top-K is also reported as a
multiple of one read of the scores (``torch.amax`` over a flat buffer of the same size) and with
the path the select took (``route``). ``linear_fisher`` is timed against cuBLAS's float32 GEMM on
the squared operands, with both errors against a float64 product, for the default GPU settings
and the alternatives in :data:`LINEAR_CONFIGS`.

Usage (on a machine with a CUDA GPU)::

    python benchmarks/gpu_bandwidth.py                    # P = 1e7 and 1e8, writes gpu_bandwidth.json
    python benchmarks/gpu_bandwidth.py --sizes 1e7 --json out.json
    python benchmarks/gpu_bandwidth.py --check --json out.json  # what benchmarks/gpu_check.sh runs

Goals (benchmarks/gpu_check.py reads them from the JSON): at P = 1e8 the top-K mask at most
0.4 ms and at least 8x ``torch.topk`` at k = 10/50/90% (fp16/bf16 no slower than fp32); Fisher
accumulation, masked average and ``masked_accumulate`` at least 85% of copy bandwidth (fp32 and
bf16); ``linear_fisher`` no slower than cuBLAS on the squared operands at the same accuracy.

Without a CUDA device it prints ``no CUDA device; nothing to measure`` and exits with status 0.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

#: Timing mode, set by main: CUDA events, or wall time for ``--device cpu`` (a run that only
#: exercises this script, with Triton under its interpreter).
CUDA = True
WARMUP = 3


def median_ms(fn, repeats: int, warmup: int | None = None) -> float:
    """Median time of ``fn`` in milliseconds, timed with CUDA events around each call."""
    for _ in range(WARMUP if warmup is None else min(warmup, WARMUP)):
        fn()
    times = []
    if not CUDA:
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - start))
        return statistics.median(times)
    torch.cuda.synchronize()
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def op(name: str, device):
    """The Triton kernel of ``torch.ops.fsmtl.<name>`` for ``device`` tensors: the registered op on
    CUDA, the launcher itself on CPU under the interpreter (schema arguments either way)."""
    from fsmtl_kernels import backends

    return backends.kernel(name, "triton", device)


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


#: ``linear_fisher`` settings timed beside the default: (label, tile sizes, GPU options).
LINEAR_CONFIGS = [
    ("ieee-64x64x32", (64, 64, 32), {"precision": "ieee", "steps": 1, "num_warps": 4, "num_stages": 2}),
    ("tf32x3-64x64x32-steps2", (64, 64, 32), {"precision": "tf32x3", "steps": 2, "num_warps": 4, "num_stages": 3}),
    ("tf32x3-128x128x32-steps4", (128, 128, 32), {"precision": "tf32x3", "steps": 4, "num_warps": 8, "num_stages": 3}),
]


def bench_fisher_accumulate(p: int, device, repeats: int, dtype: torch.dtype) -> dict:
    from fsmtl_kernels import reference

    sizes = split_sizes(p)
    grads = [torch.randn(n, device=device, dtype=dtype) for n in sizes]
    fisher = [torch.zeros(n, device=device) for n in sizes]
    run = op("fisher_accumulate", device)
    ms = median_ms(lambda: run(fisher, grads, 1.0, False), repeats)
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
    run = op("masked_grad_average", device)
    ms = median_ms(lambda: run(grads, mask.words, mask.word_offsets, "tasks", out), repeats)
    eager = median_ms(lambda: reference.masked_grad_average(grads, mask.to_bool_stacked(), "tasks", out), repeats)
    item = torch.finfo(dtype).bits // 8
    n_bytes = tasks * p * item + tasks * mask.words.shape[1] * 4 + p * item
    name = f"masked_grad_average[T={tasks},{str(dtype)[6:]}]"
    return row(name, p, ms, n_bytes, {"eager_loop": eager}, device, repeats)


def bench_masked_accumulate(p: int, device, repeats: int, dtype: torch.dtype) -> dict:
    import fsmtl_kernels as fk
    from fsmtl_kernels import reference

    sizes = split_sizes(p)
    grads = [torch.randn(n, device=device, dtype=dtype) for n in sizes]
    mask = fk.PackedMask.from_bool_stacked([torch.rand(2, n, device=device) < 0.3 for n in sizes])
    acc = [torch.zeros(n, device=device) for n in sizes]
    run = op("masked_accumulate", device)
    ms = median_ms(lambda: run(acc, grads, mask.words, mask.word_offsets, 1), repeats)
    eager = median_ms(lambda: reference.masked_accumulate(acc, grads, mask.words, mask.word_offsets, 1), repeats)
    item = torch.finfo(dtype).bits // 8
    n_bytes = p * item + mask.words.shape[1] * 4 + 8 * p  # read g and one mask row, read + write acc
    return row(f"masked_accumulate[{str(dtype)[6:]}]", p, ms, n_bytes, {"eager_loop": eager}, device, repeats)


def bench_topk_mask(p: int, ratio: float, device, repeats: int, dtype=torch.float32, slow_peers=True) -> dict:
    import fsmtl_kernels as fk
    from fsmtl_kernels import reference
    from fsmtl_kernels.packed_mask import word_layout
    from fsmtl_kernels.triton import topk_mask as tk

    sizes = split_sizes(p)
    layout = word_layout(sizes)
    scores = [torch.rand(1, n, device=device).to(dtype) for n in sizes]
    k = int(ratio * p + 0.5)
    # The public function (its checks and host work included) and the registered op alone.
    ms = median_ms(lambda: fk.topk_mask_batched(scores, [k], backend="triton"), max(3, repeats // 2))
    run = op("topk_mask", device)
    op_ms = median_ms(lambda: run(scores, [k], *layout), max(3, repeats // 2))
    flat = torch.cat([s.reshape(-1) for s in scores])
    one_read = median_ms(lambda: torch.amax(flat), repeats)
    peers = {"torch_topk_cat": median_ms(lambda: torch.topk(torch.cat([s.reshape(-1) for s in scores]), k), 3, 1)}
    if slow_peers:
        peers["torch_kthvalue_cat"] = median_ms(
            lambda: torch.kthvalue(torch.cat([s.reshape(-1).float() for s in scores]), p - k + 1), 3, warmup=1
        )
        peers["eager_loop"] = median_ms(lambda: reference.topk_mask([s.float() for s in scores], [k], *layout), 3, 1)
    name = f"topk_mask[k={ratio:.0%}]" if dtype == torch.float32 else f"topk_mask[k={ratio:.0%},{str(dtype)[6:]}]"
    out = row(name, p, ms, None, peers, device, repeats)
    out["op_ms"] = round(op_ms, 4)
    out["one_read_ms"] = round(one_read, 4)
    out["ratio_to_one_read"] = round(ms / one_read, 2)
    out["route"] = int(tk.topk_select(scores, [k], *layout)[1][0, tk.ROUTE.value])
    return out


def bench_fisher_topk(p: int, ratio: float, device, repeats: int) -> dict:
    """``fisher_topk`` (the top-K's classifying pass inside the accumulation) against the Fisher
    accumulation followed by the top-K, one task with batch gradients."""
    import fsmtl_kernels as fk

    sizes = split_sizes(p)
    params = [torch.empty(n, device=device) for n in sizes]
    grads = [torch.randn(n, device=device) for n in sizes]

    def unfused():
        fisher = fk.fisher_accumulate([torch.zeros(n, device=device) for n in sizes], grads, backend="triton")
        return fk.topk_mask(fisher, ratio, backend="triton")

    ms = median_ms(lambda: fk.fisher_topk(params, grads, ratio, backend="triton"), max(3, repeats // 2))
    peers = {"accumulate_then_topk": median_ms(unfused, max(3, repeats // 2))}
    return row(f"fisher_topk[k={ratio:.0%}]", p, ms, None, peers, device, repeats)


def bench_linear_fisher(device, repeats: int, n: int = 4096, n_out: int = 4096, n_in: int = 4096) -> list[dict]:
    """The default settings and :data:`LINEAR_CONFIGS` against cuBLAS's float32 GEMM on the squared
    operands (``torch.addmm``, TF32 off) and the eager path (squares, then the GEMM); errors are the
    largest absolute difference to a float64 product, relative to its largest entry."""
    from fsmtl_kernels import reference
    from fsmtl_kernels.triton import _utils
    from fsmtl_kernels.triton import linear_fisher as lf

    if CUDA:
        torch.backends.cuda.matmul.allow_tf32 = False
    g, a = torch.randn(n, n_out, device=device), torch.randn(n, n_in, device=device)
    g2, a2 = g.square(), a.square()
    exact = g2.double().t() @ a2.double()
    scale = exact.abs().max().item()
    wf, bf = torch.zeros(n_out, n_in, device=device), torch.zeros(n_out, device=device)
    cublas_ms = median_ms(lambda: torch.addmm(wf, g2.t(), a2), repeats)
    eager = median_ms(lambda: reference.linear_fisher(g, a, wf, bf, 1.0), repeats)
    cublas_err = ((torch.addmm(wf, g2.t(), a2).double() - exact).abs().max().item()) / scale
    rows = []
    run = op("linear_fisher", device)
    default = (_utils.GPU_BLOCKS["linear"], dict(lf.GPU_OPTIONS))
    for label, blocks, options in [("default", *default), *LINEAR_CONFIGS]:
        name = f"linear_fisher[{n}x{n_out}x{n_in}]" + ("" if label == "default" else f"[{label}]")
        _utils.GPU_BLOCKS["linear"], lf.GPU_OPTIONS = blocks, options
        try:
            ms = median_ms(lambda: run(g, a, wf, bf, 1.0), repeats)
            out_w = torch.zeros(n_out, n_in, device=device)
            run(g, a, out_w, None, 1.0)
            err = (out_w.double() - exact).abs().max().item() / scale
        except Exception as exc:  # a setting that does not compile here is reported, not fatal
            rows.append({"kernel": name, "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
            continue
        finally:
            _utils.GPU_BLOCKS["linear"], lf.GPU_OPTIONS = default[0], dict(default[1])
        out = row(name, n_out * n_in, ms, None, {"cublas_squared": cublas_ms, "eager_loop": eager}, device, repeats)
        out.update(tflops=round(2 * n * n_out * n_in / ms / 1e9, 2), rel_error=err, cublas_rel_error=cublas_err)
        out["settings"] = {"blocks": list(blocks), **options}
        rows.append(out)
    return rows


class ProgressRows(list):
    """The rows measured so far, written into ``path`` (with ``result``'s header) after each
    addition, so that a run stopped by a time limit still leaves what it measured."""

    def __init__(self, result: dict, path: Path) -> None:
        super().__init__()
        self.result, self.path = result, path

    def __iadd__(self, rows):
        self.extend(rows)
        print("measured " + ", ".join(r["kernel"] for r in rows), flush=True)
        self.result["rows"] = list(self)
        self.path.write_text(json.dumps(self.result, indent=2))
        return self


def guarded(fn, *args, **kwargs) -> list[dict]:
    """``fn``'s row(s); a kernel that fails is one row naming the error (the others still run)."""
    name = kwargs.pop("name")
    try:
        out = fn(*args, **kwargs)
    except Exception as exc:
        print(f"{name}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return [{"kernel": name, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}]
    finally:
        if CUDA:
            torch.cuda.empty_cache()
    return out if isinstance(out, list) else [out]


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
    parser.add_argument(
        "--check",
        action="store_true",
        help="the device check's preset: P = 1e8, 10 repeats, without the slow peers (kthvalue, eager top-K)",
    )
    parser.add_argument("--dtypes", default="float32,bfloat16,float16", help="score/gradient dtypes to measure")
    parser.add_argument("--ratios", default="0.1,0.5,0.9", help="top-K keep ratios")
    parser.add_argument("--linear-size", type=int, default=4096, help="N = out = in of the linear_fisher GEMM")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls before each measurement")
    parser.add_argument(
        "--device",
        default="cuda",
        choices=("cuda", "cpu"),
        help="cpu: run every measurement on CPU tensors (set TRITON_INTERPRET=1), to check this script",
    )
    args = parser.parse_args(argv)
    if args.check:
        args.sizes, args.repeats = [1e8], min(args.repeats, 10)
    global CUDA, WARMUP
    CUDA, WARMUP = args.device == "cuda", args.warmup
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    ratios = [float(r) for r in args.ratios.split(",")]

    if CUDA and not torch.cuda.is_available():
        print("no CUDA device; nothing to measure")
        return 0
    try:
        from fsmtl_kernels import triton as tb
    except ImportError as exc:
        print(f"the Triton backend cannot be imported ({exc}); install triton to measure it")
        return 1
    device = torch.device("cuda", torch.cuda.current_device()) if CUDA else torch.device("cpu")
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

    device_name = torch.cuda.get_device_name(device) if CUDA else "cpu (Triton interpreted: checks this script only)"
    result = {
        "device": device_name,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "blocks": dict(_utils.GPU_BLOCKS),
        "rows": [],
    }
    rows = ProgressRows(result, args.json)
    for p in (int(s) for s in args.sizes):
        for dtype in dtypes if wanted("fisher_accumulate") else ():
            rows += guarded(bench_fisher_accumulate, p, device, args.repeats, dtype, name=f"fisher_accumulate[{dtype}]")
        for dtype in [d for d in dtypes if d != torch.float16] if wanted("masked_grad_average") else ():
            name = f"masked_grad_average[{dtype}]"
            rows += guarded(bench_masked_grad_average, p, args.tasks, device, args.repeats, dtype, name=name)
        for dtype in [d for d in dtypes if d != torch.float16] if wanted("masked_accumulate") else ():
            rows += guarded(bench_masked_accumulate, p, device, args.repeats, dtype, name=f"masked_accumulate[{dtype}]")
        for dtype in dtypes if wanted("topk_mask") else ():
            for ratio in ratios:
                rows += guarded(
                    bench_topk_mask, p, ratio, device, args.repeats, dtype, slow_peers=not args.check,
                    name=f"topk_mask[k={ratio:.0%},{dtype}]",
                )  # fmt: skip
        if wanted("topk_mask") and torch.float32 in dtypes and 0.5 in ratios:
            # The other top-K block size, for the choice of GPU_BLOCKS["topk"].
            other = 4096 if _utils.GPU_BLOCKS["topk"] != 4096 else 2048
            default_block, _utils.GPU_BLOCKS["topk"] = _utils.GPU_BLOCKS["topk"], other
            try:
                extra = guarded(bench_topk_mask, p, 0.5, device, args.repeats, slow_peers=False, name="topk_mask")
            finally:
                _utils.GPU_BLOCKS["topk"] = default_block
            for r in extra:
                r["kernel"] += f"[block={other}]"
            rows += extra
        if wanted("fisher_topk"):
            rows += guarded(bench_fisher_topk, p, 0.5, device, args.repeats, name="fisher_topk")
    if wanted("linear_fisher"):
        n = args.linear_size
        rows += guarded(bench_linear_fisher, device, args.repeats, n, n, n, name="linear_fisher")

    keys = ["kernel", "P", "ms", "gbps", "copy_gbps", "ratio_to_copy", "ratio_to_one_read"]
    print(f"{device_name}, torch {torch.__version__}, triton {triton.__version__}, blocks {_utils.GPU_BLOCKS}")
    print(" | ".join(f"{k:>14}" for k in keys) + " | speed-ups")
    for r in rows:
        if "error" in r:
            print(f"{r['kernel']:>14} | error: {r['error']}")
            continue
        speedups = ", ".join(f"{k[11:]}: {v}x" for k, v in r.items() if k.startswith("speedup_vs_"))
        print(" | ".join(f"{str(r.get(k, '')):>14}" for k in keys) + f" | {speedups}")
    print(f"wrote {args.json}")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
