"""Helpers shared by the Triton launchers: interpreter detection, block sizes, segment tables and
the grouped launches over them (:func:`segment_launches`), contiguous work buffers.

Every op runs over a *list* of parameters in one launch. The launcher describes the parameters
in a small int64 "segment table" on the device, one row per non-empty parameter (data pointers,
entry count, first block of the launch, op-specific columns such as a word offset); program
``b`` of the 1-D block grid finds its parameter by a binary search over the rows' first-block
column (:func:`find_segment`). No gradient or score is copied or concatenated. Under
``TRITON_INTERPRET=1`` the table holds host addresses of CPU tensors, which the interpreter
dereferences directly (checked by the tests).

Parameters whose pointers are 16-byte aligned and whose sizes are multiples of 8 go in one
launch compiled with alignment hints (128-bit loads), the others in a second launch without:
a pointer read from a table has no alignment the compiler can see, and one odd-sized bias
would otherwise cost every weight its vector loads. So an op is one launch per alignment class
(and per dtype where dtypes differ), usually one or two, never one per parameter.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

#: torch dtype -> Triton element type, for the pointer casts of the segment tables.
TL_DTYPES = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}

#: Block sizes (entries per program; multiples of 32 so that a block owns whole mask words).
#: On a GPU they are the usual sizes for memory-bound kernels; under the interpreter each
#: program costs ~0.6 ms of Python, so blocks are large. Tests override entries (e.g. small
#: blocks to cross block boundaries) with ``monkeypatch.setitem``.
#: On an H100 (triton 3.6, P = 1e8, fp32) Fisher accumulation reached 86% of copy bandwidth with
#: 4096-entry blocks against 77% with 2048, and the masked average 73% with 1024 against 66-71%
#: with 2048 (and 14% with 4096): benchmarks/results/gpu-bandwidth-h100-2026-11-25*.json. The top-K's
#: classifying pass takes 113 registers per thread at 2048 entries and 8 warps (sm_90, triton 3.9),
#: so two programs fit on an SM; at 4096 one (166 registers).
GPU_BLOCKS = {"fisher": 4096, "average": 1024, "topk": 2048, "linear": (128, 128, 32)}
INTERPRETER_BLOCKS = {"fisher": 8192, "average": 8192, "topk": 8192, "linear": (64, 64, 64)}

_TABLE_CACHE: OrderedDict[tuple, torch.Tensor] = OrderedDict()
_TABLE_CACHE_SIZE = 256


def is_interpreter() -> bool:
    """True when Triton runs its CPU interpreter (``TRITON_INTERPRET=1`` in the environment)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def block_size(op: str, largest: int | None = None):
    """The block size of ``op`` for the current mode (interpreter or GPU).

    Interpreted, a block never exceeds the largest parameter (``largest`` entries, rounded up to
    a power of two, at least 32): each interpreted operation costs in proportion to the block.
    """
    if not is_interpreter():
        return GPU_BLOCKS[op]
    block = INTERPRETER_BLOCKS[op]
    if largest is not None and op != "linear":
        block = min(block, max(32, triton.next_power_of_2(largest)))
    return block


def num_warps(block: int) -> int:
    """Warps for an elementwise block of ``block`` entries (8 from 2048 up, as Triton's tutorials)."""
    return 8 if block >= 2048 else 4


def log2_ceil(n: int) -> int:
    """Steps of the binary search over ``n`` table rows (0 for one row)."""
    return max(0, math.ceil(math.log2(n))) if n > 1 else 0


def persistent_programs(device: torch.device, total_blocks: int) -> int:
    """Programs of a grid-stride loop: a few per SM on a GPU, one per block when interpreted."""
    if device.type != "cuda" or is_interpreter():
        return max(1, total_blocks)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(total_blocks, 4 * sms))


def segment_table(rows: list[tuple[int, ...]], device: torch.device) -> torch.Tensor:
    """An int64 ``[len(rows), C]`` tensor on ``device`` holding ``rows``.

    Tables are cached by content: two calls with the same pointers and sizes describe the same
    memory, so reusing the device copy is exact and saves a host-to-device copy per call (the
    usual case in a training loop, where the same buffers are passed every step).
    """
    key = (str(device), tuple(rows))
    table = _TABLE_CACHE.get(key)
    if table is None:
        table = torch.tensor(rows, dtype=torch.int64)
        if device.type == "cuda":
            # From pinned memory without blocking: a pageable copy would wait for the GPU to
            # finish all queued work (a stall per launch whose pointers are new).
            table = table.pin_memory().to(device, non_blocking=True)
        else:
            table = table.to(device)
        _TABLE_CACHE[key] = table
        if len(_TABLE_CACHE) > _TABLE_CACHE_SIZE:
            _TABLE_CACHE.popitem(last=False)
    else:
        _TABLE_CACHE.move_to_end(key)
    return table


def cdiv(n: int, d: int) -> int:
    """``ceil(n / d)`` for host ints (``triton.cdiv`` is a jit function: ~10 us per host call)."""
    return -(-n // d)


def block_starts(numels: list[int], block: int) -> tuple[list[int], int]:
    """First global block of each parameter and the total number of blocks."""
    starts, total = [], 0
    for n in numels:
        starts.append(total)
        total += cdiv(n, block)
    return starts, total


def is_aligned(pointers, n: int) -> bool:
    """True when every pointer is 16-byte aligned and ``n`` is a multiple of 8 entries.

    Then every row ``base + r * n`` of every tensor and every block start stays 16-byte aligned
    (items of 2 to 8 bytes) and masks are constant over 16-byte groups, so a kernel may promise
    this to the compiler (``tl.multiple_of``) and get 128-bit loads and stores. Pointers read from
    a table are otherwise of unknown alignment and each entry is loaded alone (checked in the PTX
    for sm_90: ``ld.global.v4`` with the hints, ``ld.global.b32`` without).
    """
    return n % 8 == 0 and all(p % 16 == 0 for p in pointers)


@dataclass(frozen=True)
class Segment:
    """One parameter of a launch: its table row is ``(*pointers, numel, first block, *extra)``.

    ``group`` (e.g. the dtypes behind the pointers) separates launches that need different
    kernel specialisations; ``pointers`` decide the alignment class.
    """

    pointers: tuple[int, ...]
    numel: int
    extra: tuple[int, ...] = ()
    group: tuple = ()


@dataclass(frozen=True)
class Launch:
    """One launch over a group of segments: its table, rows, blocks and the shared meta-parameters."""

    group: tuple
    table: torch.Tensor
    n_segments: int
    n_blocks: int
    meta: dict


def segment_launches(segments: list[Segment], block: int, device: torch.device) -> list[Launch]:
    """The launches covering the non-empty ``segments``: one per (``group``, alignment class), in
    order of first appearance, position order kept inside each. ``meta`` holds ``LOG_SEGMENTS``,
    ``BLOCK``, ``ALIGNED`` and ``num_warps`` for the kernel call."""
    groups: dict[tuple, list[Segment]] = {}
    for seg in segments:
        if seg.numel:
            groups.setdefault((seg.group, is_aligned(seg.pointers, seg.numel)), []).append(seg)
    launches = []
    for (group, aligned), segs in groups.items():
        starts, n_blocks = block_starts([s.numel for s in segs], block)
        rows = [(*s.pointers, s.numel, first, *s.extra) for s, first in zip(segs, starts, strict=True)]
        meta = {"LOG_SEGMENTS": log2_ceil(len(rows)), "BLOCK": block, "ALIGNED": aligned, "num_warps": num_warps(block)}
        launches.append(Launch(group, segment_table(rows, device), len(rows), n_blocks, meta))
    return launches


def writable(tensors: list[torch.Tensor], *, keep_values: bool) -> list[torch.Tensor]:
    """Contiguous buffers a kernel may write for ``tensors``: the tensor itself when contiguous,
    else a contiguous copy (``keep_values``) or an uninitialised buffer (outputs that are
    overwritten). :func:`copy_back` writes them into the originals."""
    out = []
    for t in tensors:
        if t.is_contiguous():
            out.append(t)
        else:
            out.append(t.contiguous() if keep_values else torch.empty(t.shape, dtype=t.dtype, device=t.device))
    return out


def copy_back(tensors: list[torch.Tensor], work: list[torch.Tensor]) -> None:
    """Write the buffers of :func:`writable` back into the non-contiguous originals."""
    for t, w in zip(tensors, work, strict=True):
        if w is not t:
            t.copy_(w)


@triton.jit
def find_segment(starts_ptr, row_stride, n_segments, block, LOG_SEGMENTS: tl.constexpr):
    """Row of the segment table that owns global block ``block``: the last row ``s`` with
    ``starts[s * row_stride] <= block`` (rows are sorted by first block, none is empty)."""
    seg = block * 0
    for i in tl.static_range(LOG_SEGMENTS):
        cand = seg + (1 << (LOG_SEGMENTS - 1 - i))
        inside = cand < n_segments
        start = tl.load(starts_ptr + cand * row_stride, mask=inside, other=0)
        seg = tl.where(inside & (start <= block), cand, seg)
    return seg


@triton.jit
def pointer_pair_row(
    table_ptr, n_segments, pid, LOG_SEGMENTS: tl.constexpr, A_DTYPE: tl.constexpr, B_DTYPE: tl.constexpr,
    ALIGNED: tl.constexpr,
):  # fmt: skip
    """The table row of block ``pid`` of a launch whose rows are (pointer a, pointer b, n, first
    block, word offset): the two typed pointers (with the 16-byte alignment hints when
    ``ALIGNED``), the parameter's size, its first block and its word offset."""
    seg = find_segment(table_ptr + 3, 5, n_segments, pid, LOG_SEGMENTS)
    row = table_ptr + seg * 5
    a_ptr = tl.load(row).to(tl.pointer_type(A_DTYPE))
    b_ptr = tl.load(row + 1).to(tl.pointer_type(B_DTYPE))
    n = tl.load(row + 2)
    if ALIGNED:
        a_ptr = tl.multiple_of(a_ptr, 16)
        b_ptr = tl.multiple_of(b_ptr, 16)
        n = tl.multiple_of(n, 8)
    return a_ptr, b_ptr, n, tl.load(row + 3), tl.load(row + 4)


@triton.jit
def pointer_pair_block(
    table_ptr,
    n_segments,
    pid,
    LOG_SEGMENTS: tl.constexpr,
    A_DTYPE: tl.constexpr,
    B_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """Block ``pid`` of a launch whose table rows are (pointer a, pointer b, n, first block, word
    offset): the two typed pointers, the parameter's size, the block's entry offsets, their
    in-range mask and the mask word offset. Inlined by Triton, so the alignment hints reach the
    caller's loads (128-bit vector loads)."""
    a_ptr, b_ptr, n, first, word_off = pointer_pair_row(
        table_ptr, n_segments, pid, LOG_SEGMENTS, A_DTYPE, B_DTYPE, ALIGNED
    )
    offs = (pid - first) * BLOCK + tl.arange(0, BLOCK)
    return a_ptr, b_ptr, n, offs, offs < n, word_off


@triton.jit
def pointer_pair_tile(
    table_ptr,
    n_segments,
    pid,
    LOG_SEGMENTS: tl.constexpr,
    A_DTYPE: tl.constexpr,
    B_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """:func:`pointer_pair_block` as a ``[BLOCK // 32, 32]`` tile, one mask word per row: the two
    pointers, ``n``, the tile's entry offsets and in-range mask, the word index of each row
    (``[BLOCK // 32, 1]``, the parameter's word offset included) with its in-range mask, and the
    bit of each column (``[1, 32]``). A kernel then loads each word once and takes bit ``j`` by a
    shift, instead of gathering the word and dividing for every entry."""
    a_ptr, b_ptr, n, first, word_off = pointer_pair_row(
        table_ptr, n_segments, pid, LOG_SEGMENTS, A_DTYPE, B_DTYPE, ALIGNED
    )
    rows = (pid - first) * (BLOCK // 32) + tl.arange(0, BLOCK // 32)[:, None]
    cols = tl.arange(0, 32)[None, :]
    offs = rows * 32 + cols
    return a_ptr, b_ptr, n, offs, offs < n, word_off + rows, rows * 32 < n, cols
