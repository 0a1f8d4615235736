"""distributed_topk_mask: the union of the ranks' masks equals topk_mask on the gathered scores."""

from __future__ import annotations

import pytest
import torch

import fsmtl_kernels as fk
from fsmtl.distributed import spawn
from fsmtl_kernels.distributed_topk_mask import distributed_topk_mask, distributed_topk_mask_batched, order_keys
from fsmtl_kernels.packed_mask import unpack_bits

SHAPES = [(7, 5), (123,), (1,), (33, 4)]


def _full_scores(seed: int, num_tasks: int) -> list[torch.Tensor]:
    """Scores with many ties (few distinct values), -0.0 and +0.0, +inf, tiny and huge values."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for shape in SHAPES:
        s = torch.randint(-3, 4, (num_tasks, *shape), generator=g).float()
        s[s == 3] = float("inf")
        s[s == -3] = -0.0
        s.view(num_tasks, -1)[:, ::11] = torch.randn(num_tasks, s[0].numel(), generator=g)[:, ::11] * 1e-30
        out.append(s)
    return out


def _slices(n: int, size: int) -> list[tuple[int, int]]:
    """Uneven dim-0 slices (FSDP2-like); the last rank may get nothing."""
    bounds = [0] + [min(n, (r + 1) * -(-n // size)) for r in range(size)]
    return [(bounds[r], bounds[r + 1]) for r in range(size)]


def _worker(rank: int, size: int, out: str, ks) -> None:
    num_tasks = len(ks)
    results = {}
    for seed in range(3):
        full = _full_scores(seed, num_tasks)
        local = [s[:, slice(*_slices(s.shape[1], size)[rank])] for s in full]
        results[seed] = distributed_topk_mask_batched(local, ks).words
    # The one-task API on a single flat slice per rank.
    flat = torch.cat([s[0].reshape(-1) for s in _full_scores(9, 1)])
    a, b = _slices(flat.numel(), size)[rank]
    results["one"] = distributed_topk_mask([flat[a:b]], 0.3).words
    torch.save(results, f"{out}/rank{rank}.pt")


@pytest.mark.parametrize("size", [2, 3])
def test_union_equals_topk_mask_bit_for_bit(tmp_path, size):
    ks = [0, 1, 150, 0.5, 1.0]
    spawn(_worker, size, (str(tmp_path), ks), timeout_s=60)
    parts = [torch.load(tmp_path / f"rank{r}.pt") for r in range(size)]
    for seed in range(3):
        full = _full_scores(seed, len(ks))
        expected = fk.topk_mask_batched(full, ks).to_bool_stacked()
        for i in range(len(full)):
            got = []
            for r in range(size):
                # this rank's local entries per parameter, and parameter i's words in its layout
                numels = [(b - a) * t[0, 0].numel() if t.dim() > 2 else b - a for t in full
                          for a, b in [_slices(t.shape[1], size)[r]]]  # fmt: skip
                start = sum(-(-m // 32) for m in numels[:i])
                got.append(unpack_bits(parts[r][seed][:, start : start + -(-numels[i] // 32)], numels[i]))
            assert torch.equal(torch.cat(got, dim=1), expected[i].reshape(len(ks), -1)), (seed, i)
    flat = torch.cat([s[0].reshape(-1) for s in _full_scores(9, 1)])
    expected = fk.topk_mask([flat], 0.3).to_bool_stacked()[0][0]
    union = torch.cat([unpack_bits(parts[r]["one"], b - a)[0] for r, (a, b) in enumerate(_slices(flat.numel(), size))])
    assert torch.equal(union, expected)


def test_single_process_equals_topk_mask():
    full = _full_scores(4, 3)
    assert torch.equal(
        distributed_topk_mask_batched(full, [5, 0.25, 200]).words, fk.topk_mask_batched(full, [5, 0.25, 200]).words
    )


def test_order_keys_preserve_float_order():
    x = torch.tensor([float("-inf"), -3.0, -1e-38, -0.0, 0.0, 1e-45, 2.0, float("inf")])
    keys = order_keys(x)
    assert keys[3] == keys[4]
    assert bool((keys[1:] >= keys[:-1]).all()) and bool((keys[1:4] > keys[:3]).all())
