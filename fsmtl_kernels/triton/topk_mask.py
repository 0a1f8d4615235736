"""Exact top-K mask by radix select, batched over tasks (grid dimension 1 = task).

1. Keys: float32 scores map to order-preserving uint32 keys (``-0.0`` is first turned into
   ``+0.0``; positive floats get the sign bit set, negative floats are bit-inverted), so a larger
   key is a larger score and ``+inf`` has the largest key of any non-NaN score.
2. Radix select: four histogram passes over 8-bit digits, most significant first. Pass ``d``
   histograms the digit of the keys whose higher digits equal the prefix chosen so far; a
   one-program-per-task select kernel then picks the digit that holds the ``k_rem``-th largest
   key and subtracts the counts above it. After the last pass the prefix *is* the key of
   the k-th largest score ``thr``, ``k_rem`` is how many entries equal to ``thr`` to take and the
   last histogram bin gives how many there are.
3. Mask: when only some of the ties are taken, a count pass stores the number of ties
   (key == thr) of each block and a cumulative sum over blocks gives each block's first tie rank
   (when all ties are taken, the common case for continuous scores, the count pass masks off
   all its loads and costs only its launch). The write pass sets the bits of every key above
   ``thr`` and of the ties whose rank (position order: parameter, then flat index) is below
   ``k_rem``, packed into the per-parameter word-aligned int32 words of :mod:`fsmtl_kernels.mask`.

Digit width: measured on an H100 (triton 3.6, 1e8 scores, 528 programs of 4096 entries), one
``tl.histogram`` pass costs 0.44 ms with 256 bins and 3.2 ms with 2048 bins, uniform or skewed
digits alike (a one-hot sum over 16 bins: 0.60 ms; one read of the scores: 0.145 ms). So four
8-bit passes (1.8 ms) beat three 11-bit ones (9.6 ms).

No concatenated copy and no sort: the scores are read once per pass (4 histogram passes and the
write, plus the count when ties are split: 5-6 reads of ``4 * P`` bytes per task) and ``P / 8``
bytes of mask written.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import _utils

#: (shift, bits) of each radix pass, most significant digit first.
DIGITS = ((24, 8), (16, 8), (8, 8), (0, 8))
MAX_BINS = tl.constexpr(1 << max(bits for _, bits in DIGITS))
#: Columns of the segment table (:class:`_utils.Segment`): scores pointer ([T, n] contiguous), n,
#: first block in this launch, word offset of the parameter's mask, first block in position order
#: over all parameters.
COLUMNS = tl.constexpr(5)


@triton.jit
def _order_keys(x):
    """Order-preserving uint32 keys of float32 ``x`` (-0.0 read as +0.0)."""
    x = tl.where(x == 0.0, 0.0, x)
    b = x.to(tl.uint32, bitcast=True)
    return tl.where((b >> 31) != 0, ~b, b | 0x80000000)


@triton.jit
def _load_block_keys(
    table_ptr, n_segments, block, task, active, LOG_SEGMENTS: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr
):
    """Keys of block ``block`` (of this launch) of task ``task`` and their in-range mask (nothing
    is read where ``active`` is False), with the parameter's size, the block's index inside the
    parameter, the parameter's word offset and the block's index in position order."""
    seg = _utils.find_segment(table_ptr + 2, COLUMNS, n_segments, block, LOG_SEGMENTS)
    row = table_ptr + seg * COLUMNS
    s_ptr = tl.load(row).to(tl.pointer_type(tl.float32))
    n = tl.load(row + 1)
    local = block - tl.load(row + 2)
    word_off = tl.load(row + 3)
    global_block = tl.load(row + 4) + local
    if ALIGNED:
        s_ptr = tl.multiple_of(s_ptr, 16)
        n = tl.multiple_of(n, 8)
    offs = local * BLOCK + tl.arange(0, BLOCK)
    # Folding ``active`` into the bound (not ``& active``) keeps the mask a plain comparison.
    mask = offs < tl.where(active, n, 0)
    x = tl.load(s_ptr + task * n + offs, mask=mask, other=0.0)
    return _order_keys(x), mask, n, local, word_off, global_block


@triton.jit
def _radix_histogram_kernel(
    table_ptr,  # int64 [S, COLUMNS] segment table of this launch
    state_ptr,  # int64 [T, 3]: key prefix chosen so far, entries still to take (k_rem), ties
    hist_ptr,  # int64 [T, MAX_BINS] histogram of this pass, zero before the pass's first launch
    n_segments,  # rows of the table
    n_blocks,  # blocks of this launch
    SHIFT: tl.constexpr,  # lowest bit of this pass's digit
    BITS: tl.constexpr,  # digit width
    FILTER: tl.constexpr,  # False on the first pass (no prefix yet)
    LOG_SEGMENTS: tl.constexpr,
    BLOCK: tl.constexpr,
    ALIGNED: tl.constexpr,  # pointers 16-byte aligned and sizes multiples of 8 (vector loads)
):
    """Histogram of digit ``(key >> SHIFT) & (2**BITS - 1)`` over the keys whose higher bits
    equal the prefix; a grid-stride loop over blocks, one atomic add per program and bin."""
    pid = tl.program_id(0).to(tl.int64)
    task = tl.program_id(1).to(tl.int64)
    step = tl.num_programs(0).to(tl.int64)
    prefix = tl.load(state_ptr + task * 3).to(tl.uint32)
    hist = tl.zeros([1 << BITS], dtype=tl.int32)
    # Blocks pid, pid + step, ...; an explicit trip count keeps the block index int64.
    for i in range(tl.cdiv(n_blocks - pid, step)):
        key, mask, _n, _local, _w, _g = _load_block_keys(
            table_ptr, n_segments, pid + i * step, task, True, LOG_SEGMENTS, BLOCK, ALIGNED
        )
        if FILTER:
            mask = mask & ((key >> (SHIFT + BITS)) == (prefix >> (SHIFT + BITS)))
        digit = ((key >> SHIFT) & ((1 << BITS) - 1)).to(tl.int32)
        hist += tl.histogram(digit, 1 << BITS, mask=mask)
    tl.atomic_add(hist_ptr + task * MAX_BINS + tl.arange(0, 1 << BITS), hist.to(tl.int64))


@triton.jit
def _radix_select_kernel(
    state_ptr,  # int64 [T, 3]: prefix, k_rem, entries in the chosen digit's bin; updated
    hist_ptr,  # int64 [T, MAX_BINS] this pass's histogram
    SHIFT: tl.constexpr,
    BITS: tl.constexpr,
):
    """Pick the digit holding the ``k_rem``-th largest key: the largest ``d`` whose suffix count
    ``sum_{j >= d} hist[j]`` reaches ``k_rem``; the counts above ``d`` are taken outright."""
    task = tl.program_id(0).to(tl.int64)
    idx = tl.arange(0, 1 << BITS)
    h = tl.load(hist_ptr + task * MAX_BINS + idx)
    prefix = tl.load(state_ptr + task * 3)
    k_rem = tl.load(state_ptr + task * 3 + 1)
    suffix = tl.cumsum(h, 0, reverse=True)
    # k_rem == 0 (k = 0) picks the top digit every pass: the prefix ends above every real key.
    digit = tl.sum((suffix >= k_rem).to(tl.int64), 0) - 1
    above = tl.sum(tl.where(idx == digit, suffix - h, 0), 0)
    in_bin = tl.sum(tl.where(idx == digit, h, 0), 0)
    tl.store(state_ptr + task * 3, prefix | (digit << SHIFT))
    tl.store(state_ptr + task * 3 + 1, k_rem - above)
    tl.store(state_ptr + task * 3 + 2, in_bin)


@triton.jit
def _tie_count_kernel(
    table_ptr,
    state_ptr,  # int64 [T, 3]: threshold key, ties to take, ties in all
    counts_ptr,  # int32 [T, total_blocks] ties per block in position order (written)
    n_segments,
    total_blocks,  # blocks over all launches (row stride of counts)
    LOG_SEGMENTS: tl.constexpr,
    BLOCK: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """Number of entries of each block whose key equals the threshold key. Tasks that take all
    their ties skip it: every load is masked off, so no score is read."""
    b = tl.program_id(0).to(tl.int64)
    task = tl.program_id(1).to(tl.int64)
    thr = tl.load(state_ptr + task * 3).to(tl.uint32)
    split = tl.load(state_ptr + task * 3 + 1) < tl.load(state_ptr + task * 3 + 2)
    key, mask, _n, _local, _w, global_block = _load_block_keys(
        table_ptr, n_segments, b, task, split, LOG_SEGMENTS, BLOCK, ALIGNED
    )
    ties = (key == thr) & mask
    tl.store(counts_ptr + task * total_blocks + global_block, tl.sum(ties.to(tl.int32), 0))


@triton.jit
def _mask_write_kernel(
    table_ptr,
    state_ptr,  # int64 [T, 3]: threshold key, ties to take, ties in all
    tie_prefix_ptr,  # int64 [T, total_blocks] inclusive cumulative tie counts in position order
    words_ptr,  # int32 [T, n_words] packed mask (written)
    n_segments,
    total_blocks,
    n_words,
    LOG_SEGMENTS: tl.constexpr,
    BLOCK: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """Bits of the block: key > thr, or key == thr with tie rank < ties to take; packed 32 per
    int32 word (bit ``j % 32`` of word ``j // 32``), padding bits 0."""
    b = tl.program_id(0).to(tl.int64)
    task = tl.program_id(1).to(tl.int64)
    thr = tl.load(state_ptr + task * 3).to(tl.uint32)
    need = tl.load(state_ptr + task * 3 + 1)
    take_all = need >= tl.load(state_ptr + task * 3 + 2)
    key, mask, n, local, word_off, global_block = _load_block_keys(
        table_ptr, n_segments, b, task, True, LOG_SEGMENTS, BLOCK, ALIGNED
    )
    ties = ((key == thr) & mask).to(tl.int32)
    inclusive = tl.cumsum(ties, 0)
    first_rank = tl.load(tie_prefix_ptr + task * total_blocks + global_block) - tl.sum(ties, 0)
    rank = first_rank + (inclusive - ties).to(tl.int64)
    selected = ((key > thr) & mask) | ((ties != 0) & (take_all | (rank < need)))
    bits = tl.reshape(selected.to(tl.int32), [BLOCK // 32, 32]) << tl.arange(0, 32)[None, :]
    # The 32 terms are distinct powers of two, so their wrapping int32 sum is their bitwise OR.
    words = tl.sum(bits, 1)
    widx = local * (BLOCK // 32) + tl.arange(0, BLOCK // 32)
    tl.store(words_ptr + task * n_words + word_off + widx, words, mask=widx < (n + 31) // 32)


def topk_mask_forward(scores, ks, word_offsets, n_words) -> torch.Tensor:
    """Kernel of ``torch.ops.fsmtl.topk_mask`` for CUDA tensors (schema arguments): packed masks
    ``[T, n_words]`` int32 of the ``ks[t]`` largest scores of each task, parameter ``i``'s bits
    from word ``word_offsets[i]`` on.

    ``scores``: contiguous float32 ``[T, *shape_i]`` (the public function makes them so).
    Parameters are launched in (at most) two groups, those allowing 128-bit loads and the
    others; blocks keep their position-order index, so tie ranks span both groups.
    """
    device = scores[0].device
    num_tasks = scores[0].shape[0]
    words = torch.zeros(num_tasks, n_words, dtype=torch.int32, device=device)
    if num_tasks == 0 or n_words == 0:
        return words
    scores = [s.contiguous() for s in scores]
    numels = [math.prod(s.shape[1:]) for s in scores]
    block = _utils.block_size("topk", max(numels))
    global_starts, total_blocks = _utils.block_starts(numels, block)
    segments = [
        _utils.Segment((s.data_ptr(),), n, (offset, first))
        for s, n, offset, first in zip(scores, numels, word_offsets, global_starts, strict=True)
    ]
    launches = _utils.segment_launches(segments, block, device)

    state = torch.tensor([[0, k, 0] for k in ks], dtype=torch.int64, device=device)
    hist = torch.zeros(len(DIGITS), num_tasks, MAX_BINS.value, dtype=torch.int64, device=device)
    for i, (shift, bits) in enumerate(DIGITS):
        for launch in launches:
            programs = _utils.persistent_programs(device, launch.n_blocks)
            _radix_histogram_kernel[(programs, num_tasks)](
                launch.table,
                state,
                hist[i],
                launch.n_segments,
                launch.n_blocks,
                SHIFT=shift,
                BITS=bits,
                FILTER=i > 0,
                **launch.meta,
            )
        _radix_select_kernel[(num_tasks,)](state, hist[i], SHIFT=shift, BITS=bits)

    counts = torch.empty(num_tasks, total_blocks, dtype=torch.int32, device=device)
    for launch in launches:
        _tie_count_kernel[(launch.n_blocks, num_tasks)](
            launch.table, state, counts, launch.n_segments, total_blocks, **launch.meta
        )
    tie_prefix = torch.cumsum(counts, dim=1, dtype=torch.int64)
    for launch in launches:
        _mask_write_kernel[(launch.n_blocks, num_tasks)](
            launch.table, state, tie_prefix, words, launch.n_segments, total_blocks, n_words, **launch.meta
        )
    return words


# Opaque to torch.compile, as fisher_accumulate (data pointers in the segment table).
torch.library.register_kernel("fsmtl::topk_mask", "cuda", topk_mask_forward)
