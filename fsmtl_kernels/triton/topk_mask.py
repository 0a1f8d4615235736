"""Exact top-K mask, batched over tasks (grid dimension 1 = task): a sampled bracket, one
classifying pass, a radix select over the few candidates, and the mask pass.

Keys: scores (fp16/bf16/fp32, read in their own dtype and upcast exactly) map to
order-preserving uint32 keys (``-0.0`` is first turned into ``+0.0``; positive floats get the sign
bit set, negative floats are bit-inverted), so a larger key is a larger score and ``+inf`` has
the largest key of any non-NaN score. Keys are never stored for the whole input.

Why not a plain radix select: Fisher scores are non-negative with bunched exponents, so a fixed
8-bit first digit puts most entries in a few buckets, and each ``tl.histogram`` pass over all
entries costs far more than the read (H100, triton 3.6, 1e8 entries: 0.44 ms with 256 bins and
3.2 ms with 2048 bins against 0.145 ms for one read; its cost grows with the bins). Four 8-bit
passes and the mask pass took 3.1 ms. So the full passes here only compare, count and compact.

Large inputs (``P >= MIN_SAMPLED``), per task:

1. *Sample*: ``SAMPLE`` scores at positions ``j * stride mod P`` (``stride`` about ``0.618 P`` and
   coprime to ``P``: spread over the parameters without the period of a row), sorted
   (``torch.sort``). The sample ranks ``q m -/+ margin`` (``q = k / P``, margin ``SIGMAS``
   standard deviations of a binomial rank) give a bracket ``lo <= hi`` of keys.
2. *Classify* (one read of the scores; this pass also finds NaN scores): counts of keys ``> hi``,
   ``== hi`` and ``== lo``, and the keys strictly inside ``(lo, hi)`` with their positions
   compacted into a buffer (a few percent of P; a block reserves its slots with one atomic add).
   The last program of a task decides: the k-th largest key is ``hi``, ``lo``, inside the
   candidates, or (bracket missed, candidate buffer full) unknown, and then the task falls back to
   the radix select over all its scores. Which case holds changes the speed, never the result.
3. *Radix select* over the candidates (or all scores on the fallback, and for small inputs):
   8-bit digits, starting at the highest bit where ``lo`` and ``hi`` differ (the candidates share
   every bit above it), so the candidates need 2-4 passes. The last program of each pass picks the
   digit holding the remaining rank; a task stops early when that bucket is taken whole.
4. *Ties*: when only some entries equal to the threshold ``thr`` are taken (ties go by position:
   parameter, then flat index), their positions are gathered from the candidates (at most
   ``TIE_CAP`` of them) and the position of the last one taken found by ranking them; with more ties, or
   ties outside the candidates, a count pass gives per-block tie counts whose prefix sums rank them.
5. *Mask* (one read): bit = ``key > gt`` or (``key == eq`` and position ``<= last``), or by tie
   rank on the count path, packed into the per-parameter word-aligned int32 words of
   :mod:`fsmtl_kernels.packed_mask`.

Bytes moved on the sampled path: two reads of the scores (classify and mask), the candidates
written and read 2-5 times (12 bytes each), ``P / 8`` bytes of mask written. No concatenated copy,
no host synchronisation until the end, where one read of a flag raises on NaN scores. GPU timings
of this design have not been measured yet (``benchmarks/gpu_check.sh`` does).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .. import _checks
from ..packed_mask import word_layout
from . import _utils

#: Inputs of at least this many entries per task take the sampled path; smaller ones the radix
#: select over all scores (four cheap passes). Tests lower it to exercise the sampled path.
MIN_SAMPLED = 1 << 18
#: Scores sampled per task for the bracket.
SAMPLE = 1 << 16
#: Width of the bracket in standard deviations of a sample rank, plus a few ranks.
SIGMAS = 6.0
MARGIN_RANKS = 16
#: Candidate buffer: this factor times the sample's estimate of the candidates, plus a pad.
CAP_FACTOR = 1.5
CAP_PAD = 1 << 12
#: Ties gathered from the candidates at most (positions sorted in one program).
TIE_CAP = tl.constexpr(1024)
RANK_CHUNK = tl.constexpr(32)
#: Digits of the radix select: 8 bits (256-bin histograms), at most 4 passes.
BITS = tl.constexpr(8)
N_BINS = tl.constexpr(256)
PASSES = tl.constexpr(4)
SAMPLE_BLOCK = tl.constexpr(1024)

#: Columns of the segment table (:class:`_utils.Segment`): scores pointer ([T, n] contiguous), n,
#: first block in this launch, word offset of the parameter's mask, first block in position order
#: over all parameters, first position in position order.
COLUMNS = tl.constexpr(6)

# Columns of the int64 per-task state [T, NS].
K = tl.constexpr(0)  # k
SOURCE = tl.constexpr(1)  # what the next radix pass reads: DONE, CANDIDATES or FULL
PREFIX = tl.constexpr(2)  # key bits resolved so far
RMASK = tl.constexpr(3)  # which bits of PREFIX are resolved
KREM = tl.constexpr(4)  # entries still to take among keys matching PREFIX
SHIFT = tl.constexpr(5)  # lowest bit of the next digit
GT = tl.constexpr(6)  # mask: key > GT is taken (int64: -1 takes every key)
EQ = tl.constexpr(7)  # mask: key == EQ is a tie (-2: no tie)
LAST = tl.constexpr(8)  # mask: ties at positions <= LAST are taken
TIES = tl.constexpr(9)  # tie mode: TIES_NONE, TIES_GATHER or TIES_COUNT
NEED = tl.constexpr(10)  # ties to take
N_TIES = tl.constexpr(11)  # entries equal to the threshold
N_GT = tl.constexpr(12)  # classify: keys > hi
N_HI = tl.constexpr(13)  # classify: keys == hi
N_LO = tl.constexpr(14)  # classify: keys == lo (lo < hi)
N_C = tl.constexpr(15)  # classify: keys in (lo, hi) (may exceed CAP: then the buffer is full)
LO_IDX = tl.constexpr(16)  # index of lo in the sorted sample (-1: key 0, below every score)
HI_IDX = tl.constexpr(17)  # index of hi in the sorted sample (-1: key 2**32 - 1)
CAP = tl.constexpr(18)  # candidate slots of this task
LO = tl.constexpr(19)  # bracket keys (set by classify)
HI = tl.constexpr(20)
NAN_POS = tl.constexpr(21)  # smallest block start holding a NaN score (NO_NAN: none)
TIE_COUNT = tl.constexpr(22)  # ties gathered
ROUTE = tl.constexpr(23)  # the path taken, a sum of the ROUTE_* flags (for tests and benchmarks)
TICKETS = tl.constexpr(24)  # programs finished: classify, the PASSES radix passes, tie gather
NS = tl.constexpr(24 + 1 + PASSES.value + 1)

#: Flags of the ROUTE column: where the classify pass found the k-th key, and how ties were ranked.
ROUTE_HI, ROUTE_CANDIDATES, ROUTE_LO, ROUTE_FALLBACK, ROUTE_TIE_GATHER, ROUTE_TIE_COUNT = 1, 2, 4, 8, 16, 32

DONE = tl.constexpr(0)
CANDIDATES = tl.constexpr(1)
FULL = tl.constexpr(2)
TIES_NONE = tl.constexpr(0)
TIES_GATHER = tl.constexpr(1)
TIES_COUNT = tl.constexpr(2)
NO_NAN = 1 << 62
MAX_POS = tl.constexpr(1 << 62)
KEY_MAX = 0xFFFFFFFF


@triton.jit
def _key_max():
    """The largest key as an int64 scalar (a bare ``0xFFFFFFFF`` literal would be a uint32)."""
    return tl.full([], 0xFFFFFFFF, tl.int64)


@triton.jit
def _order_keys(x):
    """Order-preserving uint32 keys of float32 ``x`` (-0.0 read as +0.0)."""
    x = tl.where(x == 0.0, 0.0, x)
    b = x.to(tl.uint32, bitcast=True)
    return tl.where((b >> 31) != 0, ~b, b | 0x80000000)


@triton.jit
def _segment_block(table_ptr, n_segments, block, LOG_SEGMENTS: tl.constexpr, S_DTYPE: tl.constexpr,
                   ALIGNED: tl.constexpr):  # fmt: skip
    """Block ``block`` of a launch: typed scores pointer, parameter size, block index inside the
    parameter, word offset, block index in position order and first position of the parameter."""
    seg = _utils.find_segment(table_ptr + 2, COLUMNS, n_segments, block, LOG_SEGMENTS)
    row = table_ptr + seg * COLUMNS
    s_ptr = tl.load(row).to(tl.pointer_type(S_DTYPE))
    n = tl.load(row + 1)
    local = block - tl.load(row + 2)
    if ALIGNED:
        s_ptr = tl.multiple_of(s_ptr, 16)
        n = tl.multiple_of(n, 8)
    return s_ptr, n, local, tl.load(row + 3), tl.load(row + 4) + local, tl.load(row + 5)


@triton.jit
def _block_keys(s_ptr, n, local, task, BLOCK: tl.constexpr):
    """int64 keys of one block of task ``task``, the in-range mask, offsets and raw values."""
    offs = local * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(s_ptr + task * n + offs, mask=mask, other=0.0).to(tl.float32)
    return _order_keys(x).to(tl.int64), mask, offs, x


@triton.jit
def _finish(st, thr, need, n_ties, gather_limit):
    """The threshold is key ``thr``: every key above it and ``need`` of its ``n_ties`` ties are
    taken, the ties found by gathering them from the candidates (when there are at most
    ``gather_limit``, 0 where they are not all candidates) or by the count pass."""
    tl.store(st + SOURCE, 0)
    tl.store(st + GT, thr)
    tl.store(st + EQ, thr)
    tl.store(st + NEED, need)
    tl.store(st + N_TIES, n_ties)
    take_all = need >= n_ties
    mode = tl.where(take_all, 0, tl.where(n_ties <= gather_limit, 1, 2))
    tl.store(st + TIES, mode)
    tl.atomic_add(st + ROUTE, tl.where(mode == 1, 16, tl.where(mode == 2, 32, 0)).to(tl.int64))
    tl.store(st + LAST, tl.where(take_all, MAX_POS, -1))


@triton.jit
def _take_from(st, gt):
    """Every key above ``gt`` is taken, no tie (``gt = -1``: every key)."""
    tl.store(st + SOURCE, 0)
    tl.store(st + GT, gt)
    tl.store(st + EQ, -2)
    tl.store(st + LAST, -1)
    tl.store(st + TIES, 0)


@triton.jit
def _radix_start(st, k):
    """Radix select over all the task's scores from the top digit."""
    tl.store(st + SOURCE, 2)
    tl.store(st + PREFIX, 0)
    tl.store(st + RMASK, 0)
    tl.store(st + KREM, k)
    tl.store(st + SHIFT, 32 - BITS)


@triton.jit
def _sample_kernel(
    table_ptr,  # int64 [S, COLUMNS] segment table of this launch
    sample_ptr,  # float32 [T, n_sample]: the sampled scores (written where they fall in this launch)
    n_segments,
    n_sample,
    total,  # P, entries per task
    stride,  # position step, coprime to P
    LOG_SEGMENTS: tl.constexpr,
    S_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Scores at positions ``j * stride mod P``; each launch writes those of its parameters."""
    task = tl.program_id(1).to(tl.int64)
    j = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    pos = (j * stride) % total
    seg = _utils.find_segment(table_ptr + 5, COLUMNS, n_segments, pos, LOG_SEGMENTS)
    row = table_ptr + seg * COLUMNS
    s_ptr = tl.load(row).to(tl.pointer_type(S_DTYPE))
    n = tl.load(row + 1)
    local = pos - tl.load(row + 5)
    inside = (j < n_sample) & (local >= 0) & (local < n)
    x = tl.load(s_ptr + task * n + local, mask=inside, other=0.0).to(tl.float32)
    tl.store(sample_ptr + task * n_sample + j, tl.where(x == 0.0, 0.0, x), mask=inside)


@triton.jit
def _bracket(st, sample_row):
    """The task's bracket keys ``lo <= hi`` from its sorted sample (int64)."""
    lo_idx = tl.load(st + LO_IDX)
    hi_idx = tl.load(st + HI_IDX)
    lo_x = tl.load(sample_row + tl.maximum(lo_idx, 0))
    hi_x = tl.load(sample_row + tl.maximum(hi_idx, 0))
    lo = tl.where(lo_idx >= 0, _order_keys(lo_x).to(tl.int64), 0)
    hi = tl.where(hi_idx >= 0, _order_keys(hi_x).to(tl.int64), _key_max())
    return lo, hi


@triton.jit
def _classify_block(st, x, mask, block_pos, lo, hi, cap, cand_key_row, cand_pos_row, BLOCK: tl.constexpr):
    """One block of the classifying pass over the float32 scores ``x``: records a NaN score (at
    the block's first position ``block_pos``), compacts the keys in ``(lo, hi)`` with their
    positions into the task's candidate rows, and returns the block's counts of keys ``> hi``,
    ``== hi`` and ``== lo``. Keys stay uint32 here (lo, hi: int64 bracket keys, both in range):
    compiled for sm_90, int64 keys and per-lane counters took 232 registers per thread."""
    if tl.sum(((x != x) & mask).to(tl.int32), 0) > 0:
        tl.atomic_min(st + NAN_POS, block_pos)
    key = _order_keys(x)
    lo32 = lo.to(tl.uint32)
    hi32 = hi.to(tl.uint32)
    inside = (key > lo32) & (key < hi32) & mask
    count = tl.sum(inside.to(tl.int32), 0)
    if count > 0:
        base = tl.atomic_add(st + N_C, count.to(tl.int64))
        slot = base + (tl.cumsum(inside.to(tl.int32), 0) - 1).to(tl.int64)
        keep = inside & (slot < cap)
        tl.store(cand_key_row + slot, key.to(tl.int32, bitcast=True), mask=keep)
        tl.store(cand_pos_row + slot, block_pos + tl.arange(0, BLOCK), mask=keep)
    above = tl.sum(((key > hi32) & mask).to(tl.int32), 0)
    at_hi = tl.sum(((key == hi32) & mask).to(tl.int32), 0)
    at_lo = tl.sum(((key == lo32) & mask).to(tl.int32), 0) * (lo < hi).to(tl.int32)
    return above, at_hi, at_lo


@triton.jit
def _classify_done(st, n_gt, n_hi, n_lo, lo, hi, cap, total, programs_total):
    """Adds a program's counts (int64 scalars); the task's last program decides where its k-th
    key lies."""
    tl.atomic_add(st + N_GT, n_gt)
    tl.atomic_add(st + N_HI, n_hi)
    tl.atomic_add(st + N_LO, n_lo)
    ticket = tl.atomic_add(st + TICKETS, 1)
    if ticket == programs_total - 1:
        # Every other program of the task has added its counts (their atomics precede their ticket).
        a = tl.atomic_add(st + N_GT, 0)
        b = a + tl.atomic_add(st + N_HI, 0)
        n_c = tl.atomic_add(st + N_C, 0)
        c = b + n_c
        d = c + tl.atomic_add(st + N_LO, 0)
        k = tl.load(st + K)
        tl.store(st + LO, lo)
        tl.store(st + HI, hi)
        if k == 0:
            _take_from(st, _key_max())
        elif k == total:
            _take_from(st, -1)
        elif (k > a) & (k <= b):
            tl.store(st + ROUTE, 1)
            _finish(st, hi, k - a, b - a, 0)
        elif (k > b) & (k <= c) & (n_c <= cap):
            # The candidates share every key bit above the highest bit where lo and hi differ.
            diff = lo ^ hi
            top = tl.zeros([], dtype=tl.int64)
            for bit in tl.static_range(32):
                top = tl.where(((diff >> bit) & 1) != 0, bit, top)
            rmask = (_key_max() << (top + 1)) & _key_max()
            tl.store(st + ROUTE, 2)
            tl.store(st + SOURCE, 1)
            tl.store(st + PREFIX, hi & rmask)
            tl.store(st + RMASK, rmask)
            tl.store(st + KREM, k - b)
            tl.store(st + SHIFT, tl.maximum(top + 1 - BITS, 0))
        elif (k > c) & (k <= d):
            tl.store(st + ROUTE, 4)
            _finish(st, lo, k - c, d - c, 0)
        else:
            tl.store(st + ROUTE, 8)
            _radix_start(st, k)


@triton.jit
def _classify_kernel(
    table_ptr,  # int64 [S, COLUMNS] segment table of this launch
    state_ptr,  # int64 [T, NS]
    sample_ptr,  # float32 [T, n_sample], sorted ascending
    cand_key_ptr,  # int32 [T, cap_stride]: candidate keys (bits of the uint32 key)
    cand_pos_ptr,  # int64 [T, cap_stride]: their positions
    n_segments,
    n_blocks,  # blocks of this launch
    n_sample,
    cap_stride,
    total,  # P
    programs_total,  # programs per task over every classify launch
    LOG_SEGMENTS: tl.constexpr,
    S_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """Counts keys ``> hi``, ``== hi``, ``== lo``, compacts the keys in ``(lo, hi)`` with their
    positions, records NaN scores; the task's last program decides where its k-th key lies."""
    pid = tl.program_id(0).to(tl.int64)
    task = tl.program_id(1).to(tl.int64)
    step = tl.num_programs(0).to(tl.int64)
    st = state_ptr + task * NS
    lo, hi = _bracket(st, sample_ptr + task * n_sample)
    cap = tl.load(st + CAP)
    n_gt = tl.zeros([], dtype=tl.int64)
    n_hi = tl.zeros([], dtype=tl.int64)
    n_lo = tl.zeros([], dtype=tl.int64)
    for i in range(tl.cdiv(n_blocks - pid, step)):
        s_ptr, n, local, _w, _g, pos0 = _segment_block(
            table_ptr, n_segments, pid + i * step, LOG_SEGMENTS, S_DTYPE, ALIGNED
        )
        offs = local * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(s_ptr + task * n + offs, mask=mask, other=0.0).to(tl.float32)
        above, at_hi, at_lo = _classify_block(
            st, x, mask, pos0 + local * BLOCK, lo, hi, cap,
            cand_key_ptr + task * cap_stride, cand_pos_ptr + task * cap_stride, BLOCK,
        )  # fmt: skip
        n_gt += above
        n_hi += at_hi
        n_lo += at_lo
    _classify_done(st, n_gt, n_hi, n_lo, lo, hi, cap, total, programs_total)


@triton.jit
def _radix_pass_kernel(
    table_ptr,  # int64 [S, COLUMNS] segment table of this launch
    state_ptr,  # int64 [T, NS]
    hist_ptr,  # int64 [T, 2**BITS] this pass's histogram, zero before the pass
    cand_key_ptr,  # int32 [T, cap_stride]
    n_segments,
    n_blocks,  # blocks of this launch
    cap_stride,
    programs_total,  # programs per task over every launch of this pass
    ticket_col,  # this pass's column of program tickets in the state
    READ_CANDIDATES: tl.constexpr,  # this launch also reads the candidates (the first launch)
    LOG_SEGMENTS: tl.constexpr,
    S_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """Histogram of the digit ``(key >> shift) & 255`` over the keys matching the resolved bits
    (from the candidates or all scores, by the task's source); the last program picks the digit
    holding the ``k_rem``-th largest key and stops the task when it is found."""
    pid = tl.program_id(0).to(tl.int64)
    task = tl.program_id(1).to(tl.int64)
    step = tl.num_programs(0).to(tl.int64)
    st = state_ptr + task * NS
    source = tl.load(st + SOURCE)
    prefix = tl.load(st + PREFIX)
    rmask = tl.load(st + RMASK)
    shift = tl.load(st + SHIFT)
    bins = tl.arange(0, N_BINS)
    if source == 2:
        hist = tl.zeros([N_BINS], dtype=tl.int32)
        for i in range(tl.cdiv(n_blocks - pid, step)):
            s_ptr, n, local, _w, _g, _p = _segment_block(
                table_ptr, n_segments, pid + i * step, LOG_SEGMENTS, S_DTYPE, ALIGNED
            )
            key, mask, _o, _x = _block_keys(s_ptr, n, local, task, BLOCK)
            digit = ((key >> shift) & (N_BINS - 1)).to(tl.int32)
            hist += tl.histogram(digit, N_BINS, mask=mask & ((key & rmask) == prefix))
        tl.atomic_add(hist_ptr + task * N_BINS + bins, hist.to(tl.int64))
    if READ_CANDIDATES:
        if source == 1:
            n_c = tl.load(st + N_C)
            hist = tl.zeros([N_BINS], dtype=tl.int32)
            for i in range(tl.cdiv(tl.cdiv(n_c, BLOCK) - pid, step)):
                offs = (pid + i * step) * BLOCK + tl.arange(0, BLOCK)
                mask = offs < n_c
                key = tl.load(cand_key_ptr + task * cap_stride + offs, mask=mask, other=0).to(tl.int64) & _key_max()
                digit = ((key >> shift) & (N_BINS - 1)).to(tl.int32)
                hist += tl.histogram(digit, N_BINS, mask=mask & ((key & rmask) == prefix))
            tl.atomic_add(hist_ptr + task * N_BINS + bins, hist.to(tl.int64))
    ticket = tl.atomic_add(st + ticket_col, 1)
    if (ticket == programs_total - 1) & (source != 0):
        h = tl.atomic_add(hist_ptr + task * N_BINS + bins, tl.zeros([N_BINS], dtype=tl.int64))
        k_rem = tl.load(st + KREM)
        suffix = tl.cumsum(h, 0, reverse=True)
        digit = tl.sum((suffix >= k_rem).to(tl.int64), 0) - 1
        above = tl.sum(tl.where(bins == digit, suffix - h, 0), 0)
        in_bin = tl.sum(tl.where(bins == digit, h, 0), 0)
        prefix = prefix | (digit << shift)
        rmask = rmask | ((N_BINS - 1) << shift)
        k_rem = k_rem - above
        if rmask == _key_max():
            _finish(st, prefix, k_rem, in_bin, tl.where(source == 1, TIE_CAP, 0))
        elif k_rem == in_bin:
            # Early exit: the bucket is taken whole, so every key from its smallest one up is. The
            # candidates lie above lo, which may share the bucket's bits.
            lowest = tl.where(source == 1, tl.maximum(prefix, tl.load(st + LO) + 1), prefix)
            _take_from(st, lowest - 1)
        else:
            tl.store(st + PREFIX, prefix)
            tl.store(st + RMASK, rmask)
            tl.store(st + KREM, k_rem)
            tl.store(st + SHIFT, tl.maximum(shift - BITS, 0))


@triton.jit
def _tie_gather_kernel(
    state_ptr,  # int64 [T, NS]
    cand_key_ptr,  # int32 [T, cap_stride]
    cand_pos_ptr,  # int64 [T, cap_stride]
    tie_pos_ptr,  # int64 [T, TIE_CAP]: positions of the candidates equal to the threshold
    cap_stride,
    BLOCK: tl.constexpr,
):
    """Positions of the ties among the candidates; the task's last program sorts them and keeps
    the position of the ``need``-th as the last tie taken."""
    pid = tl.program_id(0).to(tl.int64)
    task = tl.program_id(1).to(tl.int64)
    step = tl.num_programs(0).to(tl.int64)
    st = state_ptr + task * NS
    mode = tl.load(st + TIES)
    if mode == 1:
        thr = tl.load(st + EQ)
        n_c = tl.load(st + N_C)
        for i in range(tl.cdiv(tl.cdiv(n_c, BLOCK) - pid, step)):
            offs = (pid + i * step) * BLOCK + tl.arange(0, BLOCK)
            mask = offs < n_c
            key = tl.load(cand_key_ptr + task * cap_stride + offs, mask=mask, other=0).to(tl.int64) & _key_max()
            tie = (key == thr) & mask
            count = tl.sum(tie.to(tl.int32), 0)
            if count > 0:
                base = tl.atomic_add(st + TIE_COUNT, count.to(tl.int64))
                slot = base + (tl.cumsum(tie.to(tl.int32), 0) - 1).to(tl.int64)
                pos = tl.load(cand_pos_ptr + task * cap_stride + offs, mask=tie, other=0)
                tl.store(tie_pos_ptr + task * TIE_CAP + slot, pos, mask=tie & (slot < TIE_CAP))
    ticket = tl.atomic_add(st + TICKETS + 1 + PASSES, 1)
    if (ticket == tl.num_programs(0) - 1) & (mode == 1):
        # The gathered positions are distinct: the last tie taken is the one with exactly
        # need - 1 smaller positions, found by comparing chunks of RANK_CHUNK with all of them.
        idx = tl.arange(0, TIE_CAP)
        n_ties = tl.load(st + N_TIES)
        row = tie_pos_ptr + task * TIE_CAP
        pos = tl.load(row + idx, mask=idx < n_ties, other=MAX_POS)
        need = tl.load(st + NEED)
        last = tl.zeros([], dtype=tl.int64)
        for c in range(tl.cdiv(n_ties, RANK_CHUNK)):
            rows = c * RANK_CHUNK + tl.arange(0, RANK_CHUNK)
            mine = tl.load(row + rows, mask=rows < n_ties, other=MAX_POS)
            rank = tl.sum((pos[None, :] < mine[:, None]).to(tl.int32), 1)
            last += tl.sum(tl.where((rank == need - 1) & (rows < n_ties), mine, 0), 0)
        tl.store(st + LAST, last)
        tl.store(st + TIES, 0)


@triton.jit
def _tie_count_kernel(
    table_ptr,
    state_ptr,  # int64 [T, NS]
    counts_ptr,  # int32 [T, total_blocks] ties per block in position order (written)
    n_segments,
    n_blocks,
    total_blocks,  # blocks over all launches (row stride of counts)
    LOG_SEGMENTS: tl.constexpr,
    S_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """Number of entries of each block whose key equals the threshold, for the tasks whose ties
    are ranked by counts; the other tasks read nothing."""
    pid = tl.program_id(0).to(tl.int64)
    task = tl.program_id(1).to(tl.int64)
    step = tl.num_programs(0).to(tl.int64)
    st = state_ptr + task * NS
    if tl.load(st + TIES) == 2:
        thr = tl.load(st + EQ)
        for i in range(tl.cdiv(n_blocks - pid, step)):
            s_ptr, n, local, _w, gblock, _p = _segment_block(
                table_ptr, n_segments, pid + i * step, LOG_SEGMENTS, S_DTYPE, ALIGNED
            )
            key, mask, _o, _x = _block_keys(s_ptr, n, local, task, BLOCK)
            tl.store(counts_ptr + task * total_blocks + gblock, tl.sum(((key == thr) & mask).to(tl.int32), 0))


@triton.jit
def _mask_write_kernel(
    table_ptr,
    state_ptr,  # int64 [T, NS]
    tie_prefix_ptr,  # int64 [T, total_blocks] inclusive cumulative tie counts (count path only)
    words_ptr,  # int32 [T, n_words] packed mask (written)
    n_segments,
    n_blocks,
    total_blocks,
    n_words,
    LOG_SEGMENTS: tl.constexpr,
    S_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """Bits of each block: ``key > gt``, or ``key == eq`` at a position ``<= last``, or (count
    path) ``key == eq`` with tie rank ``< need``; 32 per int32 word (bit ``j % 32`` of word
    ``j // 32``), padding bits 0."""
    pid = tl.program_id(0).to(tl.int64)
    task = tl.program_id(1).to(tl.int64)
    step = tl.num_programs(0).to(tl.int64)
    st = state_ptr + task * NS
    gt = tl.load(st + GT)
    eq = tl.load(st + EQ)
    last = tl.load(st + LAST)
    by_rank = tl.load(st + TIES) == 2
    need = tl.load(st + NEED)
    for i in range(tl.cdiv(n_blocks - pid, step)):
        s_ptr, n, local, word_off, gblock, pos0 = _segment_block(
            table_ptr, n_segments, pid + i * step, LOG_SEGMENTS, S_DTYPE, ALIGNED
        )
        key, mask, offs, _x = _block_keys(s_ptr, n, local, task, BLOCK)
        tie = key == eq
        selected = (key > gt) | (tie & (pos0 + offs <= last))
        if by_rank:
            ties = (tie & mask).to(tl.int32)
            inclusive = tl.cumsum(ties, 0)
            first = tl.load(tie_prefix_ptr + task * total_blocks + gblock) - tl.sum(ties, 0)
            selected = selected | ((ties != 0) & (first + (inclusive - ties).to(tl.int64) < need))
        bits = tl.reshape((selected & mask).to(tl.int32), [BLOCK // 32, 32]) << tl.arange(0, 32)[None, :]
        # The 32 terms are distinct powers of two, so their wrapping int32 sum is their bitwise OR.
        words = tl.sum(bits, 1)
        widx = local * (BLOCK // 32) + tl.arange(0, BLOCK // 32)
        tl.store(words_ptr + task * n_words + word_off + widx, words, mask=widx < (n + 31) // 32)


def bracket(k: int, total: int, m: int) -> tuple[int, int, int]:
    """Sorted-sample indices ``(lo_idx, hi_idx)`` bracketing the k-th largest of ``total`` scores
    (-1: the bracket is open on that side) and the candidate slots to reserve."""
    q = k / total
    mid = q * m
    margin = SIGMAS * math.sqrt(m * q * (1.0 - q)) + MARGIN_RANKS
    hi_rank = math.floor(mid - margin)  # descending sample rank, 0 = the largest
    lo_rank = math.ceil(mid + margin)
    hi_idx = m - 1 - hi_rank if hi_rank >= 0 else -1
    lo_idx = m - 1 - lo_rank if lo_rank <= m - 1 else -1
    fraction = (min(lo_rank, m) - max(hi_rank, -1)) / m
    cap = min(total, math.ceil(CAP_FACTOR * fraction * total) + CAP_PAD)
    return lo_idx, hi_idx, cap


def sample_stride(total: int) -> int:
    """A position step near ``0.618 * total`` and coprime to it (distinct, well-spread positions)."""
    stride = max(1, int(total * 0.6180339887498949))
    while math.gcd(stride, total) != 1:
        stride += 1
    return stride


def topk_mask_forward(scores, ks, word_offsets, n_words) -> torch.Tensor:
    """Kernel of ``torch.ops.fsmtl.topk_mask`` for CUDA tensors (schema arguments): packed masks
    ``[T, n_words]`` int32 of the ``ks[t]`` largest scores of each task, parameter ``i``'s bits
    from word ``word_offsets[i]`` on. Raises ``ValueError`` naming ``scores[i]`` on a NaN score.

    ``scores``: ``[T, *shape_i]`` fp16/bf16/fp32, read in their dtype. Parameters are launched in
    groups of one dtype and alignment class (128-bit loads where allowed); blocks and positions
    keep their order over all parameters, so tie ranks span the groups.
    """
    return topk_select(scores, ks, word_offsets, n_words)[0]


@dataclass
class Plan:
    """One batched select: the launches over the scores, the uploaded per-task state and
    histograms, the candidate buffers and the sample size (``sampled``: the bracket is used)."""

    device: torch.device
    num_tasks: int
    numels: list[int]
    total: int
    pos_starts: list[int]
    block: int
    total_blocks: int
    launches: list
    sampled: bool
    n_sample: int
    state: torch.Tensor
    hist: torch.Tensor
    cand_keys: torch.Tensor
    cand_pos: torch.Tensor
    cap_stride: int


def plan(scores, ks) -> Plan:
    """The launches and zeroed work of one select over ``scores`` (``[T, *shape_i]`` contiguous,
    ``P > 0``): one upload holds the per-task state and the histograms of every pass."""
    device = scores[0].device
    num_tasks = scores[0].shape[0]
    numels = [math.prod(s.shape[1:]) for s in scores]
    total = sum(numels)
    sampled = total >= MIN_SAMPLED
    block = _utils.block_size("topk", max(numels))
    global_starts, total_blocks = _utils.block_starts(numels, block)
    pos_starts = [0]
    for n in numels[:-1]:
        pos_starts.append(pos_starts[-1] + n)
    offsets = word_layout(numels)[0]
    segments = [
        _utils.Segment((s.data_ptr(),), n, (offset, first, start), (s.dtype,))
        for s, n, offset, first, start in zip(scores, numels, offsets, global_starts, pos_starts, strict=True)
    ]
    launches = _utils.segment_launches(segments, block, device)
    m = min(SAMPLE, total)
    n_bins = N_BINS.value
    rows = []  # Python lists: element writes into a tensor cost microseconds each
    caps = [0]
    for k in ks:
        row = [0] * NS.value
        row[K.value] = k
        row[NAN_POS.value] = NO_NAN
        if k == 0 or k == total:
            row[GT.value], row[EQ.value], row[LAST.value] = (KEY_MAX if k == 0 else -1), -2, -1
        elif sampled:
            row[LO_IDX.value], row[HI_IDX.value], row[CAP.value] = bracket(k, total, m)
            caps.append(row[CAP.value])
        else:
            row[SOURCE.value], row[KREM.value], row[SHIFT.value] = FULL.value, k, 32 - BITS.value
        rows.extend(row)
    size = num_tasks * (NS.value + PASSES.value * n_bins)
    host = torch.zeros(size, dtype=torch.int64, pin_memory=device.type == "cuda")
    host[: num_tasks * NS.value] = torch.tensor(rows, dtype=torch.int64)
    work = host.to(device, non_blocking=True) if device.type == "cuda" else host
    cap_stride = max(caps)
    return Plan(
        device,
        num_tasks,
        numels,
        total,
        pos_starts,
        block,
        total_blocks,
        launches,
        sampled,
        m,
        work[: num_tasks * NS.value].view(num_tasks, NS.value),
        work[num_tasks * NS.value :].view(PASSES.value, num_tasks, n_bins),
        torch.empty(num_tasks, max(cap_stride, 1), dtype=torch.int32, device=device),
        torch.empty(num_tasks, max(cap_stride, 1), dtype=torch.int64, device=device),
        cap_stride,
    )


def _meta(launch) -> dict:
    return {"S_DTYPE": _utils.TL_DTYPES[launch.group[0]], **launch.meta}


def classify_scores(p: Plan) -> None:
    """Sample, sort and classify the scores of every task (the sampled path's first stage)."""
    sample = torch.empty(p.num_tasks, p.n_sample, dtype=torch.float32, device=p.device)
    stride = sample_stride(p.total)
    for launch in p.launches:
        _sample_kernel[(_utils.cdiv(p.n_sample, SAMPLE_BLOCK.value), p.num_tasks)](
            launch.table,
            sample,
            launch.n_segments,
            p.n_sample,
            p.total,
            stride,
            LOG_SEGMENTS=launch.meta["LOG_SEGMENTS"],
            S_DTYPE=_utils.TL_DTYPES[launch.group[0]],
            BLOCK=SAMPLE_BLOCK,
        )
    sample = torch.sort(sample, dim=1).values
    grids = [_utils.persistent_programs(p.device, launch.n_blocks) for launch in p.launches]
    for launch, programs in zip(p.launches, grids, strict=True):
        _classify_kernel[(programs, p.num_tasks)](
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
            **_meta(launch),
        )


def select_and_mask(p: Plan, n_words: int) -> torch.Tensor:
    """The radix passes, the ties and the mask pass of a planned select (after the classifying
    pass on the sampled path); raises on a NaN score the classifying pass found."""
    # Interpreted, one program strides over the candidates (most slots are unused).
    cand_blocks = 1 if _utils.is_interpreter() else _utils.cdiv(p.cap_stride, p.block)
    grids = [_utils.persistent_programs(p.device, launch.n_blocks) for launch in p.launches]
    grids[0] = max(grids[0], _utils.persistent_programs(p.device, cand_blocks))
    for i in range(PASSES.value):
        for j, (launch, programs) in enumerate(zip(p.launches, grids, strict=True)):
            _radix_pass_kernel[(programs, p.num_tasks)](
                launch.table,
                p.state,
                p.hist[i],
                p.cand_keys,
                launch.n_segments,
                launch.n_blocks,
                p.cap_stride,
                sum(grids),
                TICKETS.value + 1 + i,
                READ_CANDIDATES=p.sampled and j == 0,
                **_meta(launch),
            )
    if p.sampled:
        tie_pos = torch.empty(p.num_tasks, TIE_CAP.value, dtype=torch.int64, device=p.device)
        programs = _utils.persistent_programs(p.device, cand_blocks)
        _tie_gather_kernel[(programs, p.num_tasks)](
            p.state, p.cand_keys, p.cand_pos, tie_pos, p.cap_stride, BLOCK=p.block
        )

    counts = torch.empty(p.num_tasks, p.total_blocks, dtype=torch.int32, device=p.device)
    grids = [_utils.persistent_programs(p.device, launch.n_blocks) for launch in p.launches]
    for launch, programs in zip(p.launches, grids, strict=True):
        _tie_count_kernel[(programs, p.num_tasks)](
            launch.table, p.state, counts, launch.n_segments, launch.n_blocks, p.total_blocks, **_meta(launch)
        )
    tie_prefix = torch.cumsum(counts, dim=1, dtype=torch.int64)
    words = torch.empty(p.num_tasks, n_words, dtype=torch.int32, device=p.device)
    for launch, programs in zip(p.launches, grids, strict=True):
        _mask_write_kernel[(programs, p.num_tasks)](
            launch.table,
            p.state,
            tie_prefix,
            words,
            launch.n_segments,
            launch.n_blocks,
            p.total_blocks,
            n_words,
            **_meta(launch),
        )
    if p.sampled:
        nan_pos = int(p.state[:, NAN_POS.value].min())
        if nan_pos != NO_NAN:
            i = bisect.bisect_right(p.pos_starts, nan_pos) - 1
            raise ValueError(f"scores[{i}] contains NaN; scores must be comparable numbers")
    return words


def topk_select(scores, ks, word_offsets, n_words) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`topk_mask_forward` and the final per-task state ``[T, NS]`` (None when there is
    nothing to select): its ``ROUTE`` column says which path each task took."""
    device = scores[0].device
    num_tasks = scores[0].shape[0]
    numels = [math.prod(s.shape[1:]) for s in scores]
    if num_tasks == 0 or sum(numels) == 0:
        return torch.zeros(num_tasks, n_words, dtype=torch.int32, device=device), None
    scores = [s.contiguous() for s in scores]
    if list(word_offsets) != word_layout(numels)[0] or n_words != word_layout(numels)[1]:
        # Another word layout (the op's schema allows one): select in the standard one, then move.
        words = torch.zeros(num_tasks, n_words, dtype=torch.int32, device=device)
        std, state = topk_select(scores, ks, *word_layout(numels))
        for n, src, dst in zip(numels, word_layout(numels)[0], word_offsets, strict=True):
            width = (n + 31) // 32
            words[:, dst : dst + width] = std[:, src : src + width]
        return words, state
    p = plan(scores, ks)
    if p.sampled:
        classify_scores(p)
    else:
        _checks.no_nan(scores, "scores")
    return select_and_mask(p, n_words), p.state


# Opaque to torch.compile, as fisher_accumulate (data pointers in the segment table).
torch.library.register_kernel("fsmtl::topk_mask", "cuda", topk_mask_forward)
