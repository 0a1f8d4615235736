"""Fisher top-K with the top-K's classifying pass inside the Fisher accumulation (paper Eq. 10-11).

``fisher_topk`` accumulates every task's Fisher ``F = sum_n g_n**2`` and then takes its top-K.
On the sampled path of :mod:`fsmtl_kernels.triton.topk_mask` the first pass over the scores only
classifies them against a bracket from a sample, so it can run where the scores are made:

1. The sample's Fisher values are computed from the gradients at the sampled positions (the same
   arithmetic as the accumulation, :func:`~fsmtl_kernels.triton.fisher_accumulate.accumulate_block`),
   sorted, and give each task's bracket.
2. One kernel per task streams its gradients, writes ``F`` (a fresh buffer: nothing is read) and
   classifies each new score as the top-K's classifying pass does.
3. The radix passes over the candidates, the ties and the mask pass follow unchanged.

Bytes moved: the gradients read once and ``F`` written once (``N * P * itemsize + 4 P``), then one
read of ``F`` by the mask pass; against accumulation then top-K this saves the zeroing of ``F``,
the accumulation's read of it and the classifying pass's read (``12 P`` bytes per task). Small
inputs (below the sampled path's threshold) accumulate, then select. GPU timings not measured yet.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _utils
from . import topk_mask as tk
from .fisher_accumulate import accumulate_block, fisher_accumulate_forward

#: Columns of the segment table: Fisher row pointer (float32), gradient pointer ([N, n] contiguous),
#: n, first block in this launch, first position in position order.
COLUMNS = tl.constexpr(5)


@triton.jit
def _fisher_row(table_ptr, seg, G_DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """Row ``seg``: typed pointers, n, first block, first position. The alignment hints are set
    here, on the loads that define the values (a hint on a helper's result is lost when the helper
    is inlined: no 128-bit accesses, checked in the PTX for sm_90)."""
    row = table_ptr + seg * COLUMNS
    f_ptr = tl.load(row).to(tl.pointer_type(tl.float32))
    g_ptr = tl.load(row + 1).to(tl.pointer_type(G_DTYPE))
    n = tl.load(row + 2)
    if ALIGNED:
        f_ptr = tl.multiple_of(f_ptr, 16)
        g_ptr = tl.multiple_of(g_ptr, 16)
        n = tl.multiple_of(n, 8)
    return f_ptr, g_ptr, n, tl.load(row + 3), tl.load(row + 4)


@triton.jit
def _sample_fisher_kernel(
    table_ptr,  # int64 [S, COLUMNS] segment table of this task and launch
    sample_ptr,  # float32 [T, n_sample]: the sampled Fisher values (written where they fall here)
    n_segments,
    n_sample,
    total,  # P
    stride,  # position step, coprime to P
    task,
    n_samples,  # N rows of the gradients (1 for batch gradients)
    scale,
    LOG_SEGMENTS: tl.constexpr,
    G_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Fisher values at positions ``j * stride mod P``, from the gradients (F starts at 0)."""
    j = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    pos = (j * stride) % total
    seg = _utils.find_segment(table_ptr + 4, COLUMNS, n_segments, pos, LOG_SEGMENTS)
    _f, g_ptr, n, _first, start = _fisher_row(table_ptr, seg, G_DTYPE, False)
    local = pos - start
    inside = (j < n_sample) & (local >= 0) & (local < n)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(n_samples):
        g = tl.load(g_ptr + s * n + local, mask=inside, other=0.0).to(tl.float32)
        acc += g * g
    f = tl.zeros([BLOCK], dtype=tl.float32) + scale * acc
    tl.store(sample_ptr + task * n_sample + j, tl.where(f == 0.0, 0.0, f), mask=inside)


@triton.jit
def _fisher_classify_kernel(
    table_ptr,  # int64 [S, COLUMNS] segment table of this task and launch
    state_ptr,  # int64 [T, NS] top-K state
    sample_ptr,  # float32 [T, n_sample], sorted ascending
    cand_key_ptr,  # int32 [T, cap_stride]
    cand_pos_ptr,  # int64 [T, cap_stride]
    n_segments,
    n_blocks,  # blocks of this launch
    n_sample,
    cap_stride,
    total,  # P
    programs_total,  # programs of this task over its launches
    task,
    n_samples,
    scale,
    LOG_SEGMENTS: tl.constexpr,
    G_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """``F = scale * sum_s g_s**2`` for the task's blocks, written, and classified against the
    task's bracket as :func:`fsmtl_kernels.triton.topk_mask._classify_kernel` does."""
    pid = tl.program_id(0).to(tl.int64)
    step = tl.num_programs(0).to(tl.int64)
    st = state_ptr + task * tk.NS
    lo, hi = tk._bracket(st, sample_ptr + task * n_sample)
    cap = tl.load(st + tk.CAP)
    n_gt = tl.zeros([], dtype=tl.int64)
    n_hi = tl.zeros([], dtype=tl.int64)
    n_lo = tl.zeros([], dtype=tl.int64)
    for i in range(tl.cdiv(n_blocks - pid, step)):
        block = pid + i * step
        seg = _utils.find_segment(table_ptr + 3, COLUMNS, n_segments, block, LOG_SEGMENTS)
        f_ptr, g_ptr, n, first, pos0 = _fisher_row(table_ptr, seg, G_DTYPE, ALIGNED)
        local = block - first
        offs = local * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        f = accumulate_block(f_ptr, g_ptr, n, offs, mask, n_samples, scale, False, BLOCK)
        above, at_hi, at_lo = tk._classify_block(
            st, f, mask, pos0 + local * BLOCK, lo, hi, cap,
            cand_key_ptr + task * cap_stride, cand_pos_ptr + task * cap_stride, BLOCK,
        )  # fmt: skip
        n_gt += above
        n_hi += at_hi
        n_lo += at_lo
    tk._classify_done(st, n_gt, n_hi, n_lo, lo, hi, cap, total, programs_total)


def fisher_topk_forward(fishers, grads, per_sample, ks, n_words) -> torch.Tensor:
    """Every task's Fisher into ``fishers`` (float32 ``[T, *shape_i]``, contiguous, overwritten)
    from ``grads[t]`` (checked as :func:`fsmtl_kernels.fisher_accumulate` does: per-sample
    ``[N_t, *shape_i]`` where ``per_sample[t]``, else ``shape_i``), and the packed masks of the
    ``ks[t]`` largest Fisher values of each task in :func:`~fsmtl_kernels.packed_mask.word_layout`'s
    layout (``n_words`` words per task). Raises ``ValueError`` naming ``scores[i]`` on NaN."""
    num_tasks = fishers[0].shape[0]
    p = tk.plan(fishers, ks) if num_tasks and any(f[0].numel() for f in fishers) else None
    if p is None or not p.sampled:
        for f in fishers:
            f.zero_()
        for t in range(num_tasks):
            fisher_accumulate_forward([f[t] for f in fishers], grads[t], 1.0, per_sample[t])
        return tk.topk_select(fishers, ks, *tk.word_layout([f[0].numel() for f in fishers]))[0]
    device = p.device
    sample = torch.empty(num_tasks, p.n_sample, dtype=torch.float32, device=device)
    stride = tk.sample_stride(p.total)
    tasks = []
    for t in range(num_tasks):
        gs = [g.contiguous() for g in grads[t]]
        segments = [
            _utils.Segment((f[t].data_ptr(), g.data_ptr()), n, (start,), (g.dtype,))
            for f, g, n, start in zip(fishers, gs, p.numels, p.pos_starts, strict=True)
        ]
        n_samples = gs[0].shape[0] if per_sample[t] else 1
        tasks.append((gs, _utils.segment_launches(segments, p.block, device), n_samples))
        for launch in tasks[-1][1]:
            _sample_fisher_kernel[(_utils.cdiv(p.n_sample, tk.SAMPLE_BLOCK.value),)](
                launch.table,
                sample,
                launch.n_segments,
                p.n_sample,
                p.total,
                stride,
                t,
                n_samples,
                1.0,
                LOG_SEGMENTS=launch.meta["LOG_SEGMENTS"],
                G_DTYPE=_utils.TL_DTYPES[launch.group[0]],
                BLOCK=tk.SAMPLE_BLOCK,
            )
    sample = torch.sort(sample, dim=1).values
    for t, (_gs, launches, n_samples) in enumerate(tasks):
        grids = [_utils.persistent_programs(device, launch.n_blocks) for launch in launches]
        for launch, programs in zip(launches, grids, strict=True):
            _fisher_classify_kernel[(programs,)](
                launch.table,
                p.state,
                sample,
                p.cand_keys,
                p.cand_pos,
                launch.n_segments,
                launch.n_blocks,
                p.n_sample,
                p.cap_stride,
                p.total,
                sum(grids),
                t,
                n_samples,
                1.0,
                G_DTYPE=_utils.TL_DTYPES[launch.group[0]],
                **launch.meta,
            )
    return tk.select_and_mask(p, n_words)
