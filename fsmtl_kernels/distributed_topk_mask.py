"""``distributed_topk_mask``: exact top-K over scores whose entries are sharded across ranks.

Every rank holds a disjoint slice of each score tensor: parameter ``i``'s flat entries are the
concatenation, in rank order, of the ranks' local ``scores[i]`` (dim-0 sharding as FSDP2's
``Shard(0)`` makes it; a rank may hold an empty slice). The union of the ranks' masks equals
:func:`fsmtl_kernels.topk_mask_batched` on the gathered scores bit for bit, ties included:

1. The k-th largest score ``thr`` is found by a radix select over order-preserving uint32 keys
   (11, 11 and 10 bits, as the Triton kernel): per pass each rank counts its candidates' digits
   in ``2^11`` bins, the ranks all-reduce those ``[T, 2048]`` counts and every rank picks the same
   digit. Three all-reduces of ``T * 2048`` int64 counts, whatever the number of entries.
2. Ties (entries equal to ``thr``) are taken in position order (parameter order, then flat index).
   Each rank counts its ties per parameter, one all-reduce of a ``[W, T, n_params]`` table (each
   rank fills its row) gives every rank its exclusive prefix: the ties of all earlier parameters
   plus those of earlier ranks in the same parameter.

Collectives go through ``torch.distributed`` (gloo on CPU, NCCL on CUDA), on ``group``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from . import _checks
from .packed_mask import PackedMask, pack_bits, word_layout

RADIX_BITS = (11, 11, 10)  # from the most significant bits down; 32 in all
BINS = 1 << max(RADIX_BITS)


def order_keys(values: torch.Tensor) -> torch.Tensor:
    """float32 -> int64 in ``[0, 2^32)`` with the float order (``-0.0`` and ``+0.0`` equal)."""
    bits = (values.float() + 0.0).view(torch.int32).to(torch.int64) & 0xFFFFFFFF  # -0.0 -> +0.0
    negative = bits >= 0x80000000
    return torch.where(negative, bits ^ 0xFFFFFFFF, bits | 0x80000000)


def _world(group) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _all_reduce(tensor: torch.Tensor, group) -> torch.Tensor:
    if _world(group)[1] > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def distributed_topk_mask(scores: Sequence[torch.Tensor], k: int | float, *, group=None) -> PackedMask:
    """Mask of the ``k`` largest scores over all ranks' entries (one task); this rank's part.

    Args:
        scores: this rank's slices, one tensor per parameter (flat order within a parameter:
            the ranks' slices in rank order).
        k: an int count or a float keep ratio of the *global* number of entries (as
            :func:`fsmtl_kernels.topk_mask`).
        group: the process group (default: the world); without an initialized process group
            this is :func:`fsmtl_kernels.topk_mask`.

    Returns:
        :class:`PackedMask` (one task) over this rank's slices.
    """
    items = _checks.tensor_list(scores, "scores")
    return distributed_topk_mask_batched(
        [s.reshape(1, -1) for s in items], k, group=group, shapes=[s.shape for s in items]
    )


def distributed_topk_mask_batched(
    scores: Sequence[torch.Tensor], k, *, group=None, shapes: Sequence[torch.Size] | None = None
) -> PackedMask:
    """:func:`distributed_topk_mask` for T tasks: ``scores[i]`` is ``[T, *local_shape_i]``;
    ``k`` is one count/ratio or a list of T of them. All ranks must pass the same T and ``k``."""
    items = _checks.tensor_list(scores, "scores", min_dim=1)
    _checks.floating(items, "scores")
    num_tasks = items[0].shape[0]
    for i, s in enumerate(items):
        if s.shape[0] != num_tasks:
            raise ValueError(f"scores[{i}] has {s.shape[0]} tasks but scores[0] has {num_tasks}")
    _checks.no_nan(items, "scores")
    shapes = [s.shape[1:] for s in items] if shapes is None else [torch.Size(s) for s in shapes]
    device = items[0].device
    rank, world = _world(group)
    numels = [s[0].numel() for s in items]
    total = _all_reduce(torch.tensor([sum(numels)], dtype=torch.int64, device=device), group)
    ks = _checks.resolve_ks(k, num_tasks, int(total.item()))
    keys = torch.cat([order_keys(s.reshape(num_tasks, -1)) for s in items], dim=1)  # [T, n_local]

    # 1. the global k-th largest key per task, by radix select over all-reduced histograms.
    prefix = torch.zeros(num_tasks, dtype=torch.int64)  # key bits fixed so far
    remaining = torch.tensor(ks, dtype=torch.int64)  # how many of the candidates are still to take
    shift = 32
    for bits in RADIX_BITS:
        shift -= bits
        hist = torch.zeros(num_tasks, BINS, dtype=torch.int64, device=device)
        for t in range(num_tasks):
            candidates = keys[t] if shift + bits == 32 else keys[t][(keys[t] >> (shift + bits)) == prefix[t]]
            digits = (candidates >> shift) & ((1 << bits) - 1)
            hist[t] = torch.bincount(digits, minlength=BINS)
        hist = _all_reduce(hist, group).cpu()
        for t in range(num_tasks):
            if ks[t] == 0:
                continue
            at_or_above = hist[t].flip(0).cumsum(0)  # at_or_above[j]: candidates with digit >= BINS-1-j
            j = int(torch.searchsorted(at_or_above, remaining[t]))
            digit = BINS - 1 - j
            remaining[t] -= at_or_above[j] - hist[t, digit]
            prefix[t] = (prefix[t] << bits) | digit
    thr = prefix.to(device)

    # 2. ties in position order: the exclusive prefix of tie counts over (parameter, rank).
    taking = torch.tensor([kt > 0 for kt in ks], device=device)[:, None]  # k = 0 takes nothing
    above = (keys > thr[:, None]) & taking
    ties = (keys == thr[:, None]) & taking
    bounds = torch.tensor([0, *numels], device=device).cumsum(0)
    table = torch.zeros(world, num_tasks, len(items), dtype=torch.int64, device=device)
    for i in range(len(items)):
        table[rank, :, i] = ties[:, bounds[i] : bounds[i + 1]].sum(1)
    table = _all_reduce(table, group)
    per_param = table.sum(0)  # [T, n_params]
    before = per_param.cumsum(1) - per_param + table[:rank].sum(0)  # ties ahead of this rank's slice
    order = torch.zeros_like(keys)
    for i in range(len(items)):
        part = ties[:, bounds[i] : bounds[i + 1]].to(torch.int64)
        order[:, bounds[i] : bounds[i + 1]] = part.cumsum(1) - part + before[:, i : i + 1]
    bits_out = above | (ties & (order < remaining.to(device)[:, None]))

    offsets, n_words = word_layout(numels)
    words = torch.zeros(num_tasks, n_words, dtype=torch.int32, device=device)
    for i, offset in enumerate(offsets):
        packed = pack_bits(bits_out[:, bounds[i] : bounds[i + 1]])
        words[:, offset : offset + packed.shape[1]] = packed
    return PackedMask(words, shapes)
