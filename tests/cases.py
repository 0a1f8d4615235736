"""Case builders and comparison rules shared by the op tests (CPU interpreter and GPU alike).

Not an oracle: the oracles are in ``oracle.py``. These build inputs (shapes that are not powers
of two, many ties, signed zeros, infinities) and compare a backend with the reference.
"""

from __future__ import annotations

import pytest
import torch

import fsmtl_kernels as fk

CPU = torch.device("cpu")
#: Parameter shapes whose sizes are not multiples of a block or of 32 (1, 7, 1023, 4097 entries).
ODD_SHAPES = [(1,), (7,), (31, 33), (4097,)]
#: The C++ kernels' shapes: single odd sizes and a mixed list.
SHAPES = [
    [(1,)],
    [(7,)],
    [(123,)],
    [(1023,)],
    [(4097,)],
    [(3, 41), (1,), (7, 9, 5), (4097,), (1023,), (2, 2)],
]
SHAPE_IDS = ["1", "7", "123", "1023", "4097", "mixed"]
GRAD_DTYPES = [torch.float16, torch.bfloat16, torch.float32]
#: Small Triton blocks, so parameters span many blocks and tie ranks cross block boundaries.
SMALL_BLOCKS = {"fisher": 64, "average": 64, "topk": 256, "linear": (16, 16, 16)}
SMALL_GPU_BLOCKS = {"fisher": 64, "average": 64, "topk": 64, "linear": (16, 16, 16)}


def tied_scores(shapes, num_tasks: int, device, seed: int = 0, levels: int = 5) -> list[torch.Tensor]:
    """Scores ``[T, *shape]`` drawn from a few levels (many ties), with -0.0, +0.0, +inf and -inf mixed in."""
    gen = torch.Generator().manual_seed(seed)
    values = torch.tensor([-float("inf"), -1.5, -0.0, 0.0, 0.25, 1.0, 3.0, float("inf")])
    out = []
    for shape in shapes:
        idx = torch.randint(0, len(values), (num_tasks, *shape), generator=gen)
        out.append(values[idx].to(device))
    # Spread a few distinct values so the radix passes see more than one populated digit.
    out[-1].view(num_tasks, -1)[:, :levels] = torch.linspace(-2.0, 2.0, levels)
    return out


def random_scores(shapes, num_tasks: int, device, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(num_tasks, *shape, generator=gen).abs().to(device) for shape in shapes]


def total_entries(shapes) -> int:
    return sum(torch.Size(s).numel() for s in shapes)


def assert_same_mask(scores, ks, backend: str = "triton") -> fk.PackedMask:
    got = fk.topk_mask_batched(scores, ks, backend=backend)
    want = fk.topk_mask_batched(scores, ks, backend="reference")  # same device: P = 1e8 stays on the GPU
    assert torch.equal(got.words, want.words), "packed words differ from the reference"
    total = want.num_entries
    expected = [ks] * want.num_tasks if isinstance(ks, (int, float)) else ks
    assert got.count().cpu().tolist() == [k if isinstance(k, int) else fk.resolve_k(k, total) for k in expected]
    return got


def random_mask(shapes, num_tasks: int, device, p: float = 0.4, seed: int = 1) -> fk.PackedMask:
    gen = torch.Generator().manual_seed(seed)
    bools = [torch.rand(num_tasks, *shape, generator=gen) < p for shape in shapes]
    return fk.PackedMask.from_bool_stacked(bools).to(device)


def assert_within_torch_error(got: torch.Tensor, ref: torch.Tensor, exact: torch.Tensor, what: str) -> None:
    """flash-attention's rule: our error against float64 is at most twice the reference's (plus fp32 ulps)."""
    ours = (got.cpu().double() - exact).abs().max().item() if got.numel() else 0.0
    theirs = (ref.cpu().double() - exact).abs().max().item() if ref.numel() else 0.0
    slack = 4 * torch.finfo(torch.float32).eps * (exact.abs().max().item() if exact.numel() else 0.0)
    assert ours <= 2 * theirs + slack, f"{what}: error {ours:.3g} vs reference error {theirs:.3g}"


def snapshot(tensors):
    return [t.clone() for t in tensors]


def assert_unchanged(before, after):
    for b, a in zip(before, after):
        assert torch.equal(b, a)


def raises_naming(exc, name, fn):
    with pytest.raises(exc) as info:
        fn()
    assert name in str(info.value), f"message does not name {name!r}: {info.value}"
