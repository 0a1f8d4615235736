"""pytest-benchmark: the C++ CPU backend against its peers, side by side, one group per case.

Tests and groups carry the op's name (``test_topk_mask``, group ``topk_mask-P1e6-k10``, ...).

The cases, peers and floors are those of ``cpu_table.py`` (which prints one Markdown table and
writes JSON). Every group checks ours against the reference before timing; the floor is a
``clone()`` of the bytes the op must move.

Run (2 threads)::

    OMP_NUM_THREADS=2 python -m pytest benchmarks/bench_cpu.py --benchmark-group-by=group
    OMP_NUM_THREADS=2 python -m pytest benchmarks/bench_cpu.py -k "topk_mask and 1e6" --benchmark-group-by=group

Performance is measured here, never asserted.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from cpu_table import (  # noqa: E402
    PER_SAMPLE_N,
    RATIOS,
    SIZES,
    SLOW,
    TASKS,
    average_peers,
    copy_floor_fn,
    fisher_peers,
    floor_fn,
    make_scores,
    split_sizes,
    topk_peers,
)

import fsmtl_kernels as fk  # noqa: E402
from fsmtl_kernels import backends  # noqa: E402

_REASON = backends.unavailable_reason("cpp", torch.device("cpu"))
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"C++ backend unavailable: {_REASON}")

FLOOR = "clone floor"
COPY = "copy_ floor"
FLOORS = {FLOOR: floor_fn, COPY: copy_floor_fn}


@pytest.fixture(scope="module")
def scores_by_size():
    cache: dict[str, list[torch.Tensor]] = {}

    def get(size: str) -> list[torch.Tensor]:
        if size not in cache:
            cache.clear()  # one size at a time: 5e7 fp32 scores are 200 MB
            cache[size] = make_scores(SIZES[size])
        return cache[size]

    return get


def _rounds(size: str, impl: str) -> int:
    total = SIZES[size]
    if total >= 50_000_000:
        return 3 if impl in SLOW else 5
    if total >= 10_000_000:
        return 5 if impl in SLOW else 9
    return 15


def _run(benchmark, group: str, size: str, impl: str, fn, nbytes: int, dtype: torch.dtype = torch.float32) -> None:
    benchmark.group = group
    benchmark.extra_info.update(
        {"P": SIZES[size], "bytes_moved": nbytes, "dtype": str(dtype)[6:], "threads": torch.get_num_threads()}
    )
    benchmark.pedantic(fn, rounds=_rounds(size, impl), warmup_rounds=1, iterations=1)


TOPK_IMPLS = [
    "ours",
    "ours (kernel only)",
    "torch.topk (sorted)",
    "torch.topk (unsorted)",
    "torch.kthvalue",
    "torch.sort",
    "numpy.partition",
]


@pytest.mark.parametrize("impl", [*TOPK_IMPLS, FLOOR, COPY])
@pytest.mark.parametrize("ratio", RATIOS, ids=[f"k{int(r * 100)}" for r in RATIOS])
@pytest.mark.parametrize("size", list(SIZES))
def test_topk_mask(benchmark, scores_by_size, size, ratio, impl):
    scores = scores_by_size(size)
    total = SIZES[size]
    k = fk.resolve_k(ratio, total)
    if impl in FLOORS:
        fn = FLOORS[impl](4 * total)
    else:
        fn = topk_peers(scores, k)[impl]
        if impl == "ours":
            mask = fn()
            assert mask.count().tolist() == [k]
            if total <= 10_000_000:
                assert mask == fk.topk_mask(scores, k, backend="reference")
    _run(benchmark, f"topk_mask-P{size}-k{int(ratio * 100)}", size, impl, fn, 4 * total + total // 8)


FISHER_CASES = [("per-sample", torch.float32), ("per-sample", torch.float16), ("batch", torch.float32)]


@pytest.mark.parametrize("impl", ["ours", "eager loop", "torch.compile loop", "torch._foreach_addcmul_", FLOOR, COPY])
@pytest.mark.parametrize("mode,dtype", FISHER_CASES, ids=["ps-fp32", "ps-fp16", "batch-fp32"])
@pytest.mark.parametrize("size", list(SIZES))
def test_fisher_accumulate(benchmark, size, mode, dtype, impl):
    n = PER_SAMPLE_N[size] if mode == "per-sample" else None
    impls, nbytes = fisher_peers(split_sizes(SIZES[size]), n, dtype)
    if impl in FLOORS:
        fn = FLOORS[impl](nbytes // 2)
    elif impl not in impls:
        pytest.skip(f"{impl} is not a peer of {mode} {dtype}")
    else:
        fn = impls[impl]
    if impl == "ours" and SIZES[size] <= 1_000_000:
        gen = torch.Generator().manual_seed(3)
        sizes = split_sizes(SIZES[size])
        grads = [torch.randn(*((n, s) if n else (s,)), generator=gen).to(dtype) for s in sizes]
        ours, ref = [torch.zeros(s) for s in sizes], [torch.zeros(s) for s in sizes]
        fk.fisher_accumulate(ours, grads, backend="cpp")
        fk.fisher_accumulate(ref, grads, backend="reference")
        for a, b in zip(ours, ref, strict=True):
            torch.testing.assert_close(a, b)
    _run(benchmark, f"fisher_accumulate-{mode}-{str(dtype)[6:]}-P{size}", size, impl, fn, nbytes, dtype)


@pytest.mark.parametrize("impl", ["ours", "python loop", FLOOR, COPY])
@pytest.mark.parametrize("num_tasks", TASKS, ids=[f"T{t}" for t in TASKS])
@pytest.mark.parametrize("size", list(SIZES))
def test_masked_grad_average(benchmark, size, num_tasks, impl):
    impls, nbytes = average_peers(split_sizes(SIZES[size]), num_tasks)
    fn = FLOORS[impl](nbytes // 2) if impl in FLOORS else impls[impl]
    if impl == "ours" and SIZES[size] <= 1_000_000:
        for a, b in zip(impls["ours"](), impls["python loop"](), strict=True):
            torch.testing.assert_close(a, b)
    _run(benchmark, f"masked_grad_average-T{num_tasks}-P{size}", size, impl, fn, nbytes)
