"""Bit-packed task masks over a list of parameters.

Layout (every backend reads and writes exactly this):

* ``words`` is an int32 tensor ``[T, W]``: row ``t`` is task ``t``'s mask.
* Parameter ``i`` (``n_i`` entries) owns words ``[word_offsets[i], word_offsets[i] + ceil(n_i / 32))``;
  each parameter starts on a fresh word so kernels can write one parameter without touching
  another's words.
* Flat entry ``j`` of parameter ``i`` (row-major ``reshape(-1)`` order) is bit ``j % 32``
  (bit 0 = least significant, little-endian) of word ``word_offsets[i] + j // 32``.
* Padding bits past ``n_i`` are 0.

:func:`word_layout` is the one place that derives this layout. A :class:`PackedMask` computes
its ``word_offsets`` once, at construction, and hands them to every backend; a kernel that
*produces* a mask (top-K) gets them from :func:`word_layout` through its public function.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._checks import tensor_list

BITS = 32
_BIT_VALUES = (torch.ones(BITS, dtype=torch.int64) << torch.arange(BITS)).to(torch.int64)


def word_layout(numels: Sequence[int]) -> tuple[list[int], int]:
    """Word offset of each parameter (``n_i`` entries) and the total number of words per task."""
    offsets, total = [], 0
    for n in numels:
        offsets.append(total)
        total += -(-int(n) // BITS)
    return offsets, total


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Pack a bool tensor ``[T, n]`` into int32 words ``[T, ceil(n / 32)]`` (little-endian bits)."""
    t, n = bits.shape
    n_words = -(-n // BITS)
    padded = torch.zeros(t, n_words * BITS, dtype=torch.int64, device=bits.device)
    padded[:, :n] = bits.to(torch.int64)
    weights = _BIT_VALUES.to(bits.device)
    packed = (padded.view(t, n_words, BITS) * weights).sum(-1)
    # Wrap to the int32 range: bit 31 set means a negative word.
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def unpack_bits(words: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: int32 ``[T, ceil(n / 32)]`` to bool ``[T, n]``."""
    shifts = torch.arange(BITS, device=words.device, dtype=torch.int64)
    bits = (words.to(torch.int64).unsqueeze(-1) >> shifts) & 1
    return bits.reshape(words.shape[0], -1)[:, :n].bool()


class PackedMask:
    """Binary masks of ``T`` tasks over the entries of a list of parameters, 1 bit per entry.

    Attributes:
        words: int32 ``[T, W]`` on the parameters' device, in the layout described in this module.
        shapes: the shape of each parameter, in parameter order.
        word_offsets: the first word of each parameter (:func:`word_layout`), computed once here.
    """

    def __init__(self, words: torch.Tensor, shapes) -> None:
        if not isinstance(words, torch.Tensor) or words.dtype != torch.int32 or words.dim() != 2:
            raise TypeError("words must be an int32 tensor of shape [T, W]")
        self.words = words
        self.shapes = tuple(torch.Size(s) for s in shapes)
        if not self.shapes:
            raise ValueError("shapes must not be empty")
        offsets, total = word_layout(self.numels)
        if words.shape[1] != total:
            raise ValueError(f"words has {words.shape[1]} words per task but shapes need {total}")
        self._word_offsets = tuple(offsets)
        self._bool_stacked: list[torch.Tensor] | None = None
        self._task_counts: list[torch.Tensor] | None = None

    def __getstate__(self) -> dict:
        # Only what defines the mask is saved; offsets and unpacked masks are rebuilt on load.
        return {"words": self.words, "shapes": self.shapes}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["words"], state["shapes"])

    @property
    def numels(self) -> list[int]:
        return [s.numel() for s in self.shapes]

    @property
    def word_offsets(self) -> list[int]:
        """The first word of each parameter in ``words`` (computed once, at construction)."""
        return list(self._word_offsets)

    @property
    def num_tasks(self) -> int:
        return self.words.shape[0]

    @property
    def num_entries(self) -> int:
        """P, the number of entries each task's mask covers."""
        return sum(self.numels)

    @property
    def device(self) -> torch.device:
        return self.words.device

    @classmethod
    def from_bool(cls, masks) -> PackedMask:
        """Pack one task's mask, given as bool tensors shaped like the parameters."""
        items = tensor_list(masks, "masks")
        return cls.from_bool_stacked([m.unsqueeze(0) for m in items])

    @classmethod
    def from_bool_stacked(cls, masks) -> PackedMask:
        """Pack bool masks of T tasks given as a list of tensors ``[T, *shape_i]``."""
        items = tensor_list(masks, "masks", min_dim=1)
        num_tasks = items[0].shape[0]
        for i, m in enumerate(items):
            if m.dtype != torch.bool:
                raise TypeError(f"masks[{i}] has dtype {m.dtype}; expected torch.bool")
            if m.shape[0] != num_tasks:
                raise ValueError(f"masks[{i}] has {m.shape[0]} tasks but masks[0] has {num_tasks}")
        words = torch.cat([pack_bits(m.reshape(num_tasks, -1)) for m in items], dim=1)
        return cls(words, tuple(m.shape[1:] for m in items))

    def to_bool_stacked(self) -> list[torch.Tensor]:
        """Bool tensors ``[T, *shape_i]``, one per parameter, on the mask's device.

        Unpacked on the first call and cached: later calls return the same tensors (a new list),
        so per-step users (the reference masked average, forward masks) unpack once per mask.
        The tensors are shared by every caller and must not be modified; ``clone()`` them first.
        """
        if self._bool_stacked is None:
            self._bool_stacked = [
                unpack_bits(self.words[:, offset : offset + -(-n // BITS)], n).reshape(self.num_tasks, *shape)
                for offset, n, shape in zip(self._word_offsets, self.numels, self.shapes)
            ]
        return list(self._bool_stacked)

    def task_counts(self) -> list[torch.Tensor]:
        """Per entry, the number of tasks whose mask holds it: int32 tensors shaped like the
        parameters (the divisor of the ``"selected"`` normalization). Counted task by task (no
        ``[T, P]`` tensor) on the first call and cached; do not modify the tensors."""
        if self._task_counts is None:
            counts = []
            for offset, n, shape in zip(self._word_offsets, self.numels, self.shapes):
                words = self.words[:, offset : offset + -(-n // BITS)]
                count = torch.zeros(n, dtype=torch.int32, device=self.device)
                for t in range(self.num_tasks):
                    count += unpack_bits(words[t : t + 1], n)[0]
                counts.append(count.reshape(shape))
            self._task_counts = counts
        return list(self._task_counts)

    def _check_task(self, task: int) -> None:
        if isinstance(task, bool) or not isinstance(task, int):
            raise TypeError(f"task must be an int, got {type(task).__name__}")
        if not -self.num_tasks <= task < self.num_tasks:
            raise ValueError(f"task={task} is out of range for {self.num_tasks} task(s)")

    def to_bool(self, task: int = 0) -> list[torch.Tensor]:
        """Task ``task``'s mask as bool tensors shaped like the parameters (views of the cache of
        :meth:`to_bool_stacked`: do not modify them)."""
        self._check_task(task)
        return [m[task] for m in self.to_bool_stacked()]

    def count(self) -> torch.Tensor:
        """Number of ones per task, int64 ``[T]``."""
        return popcount(self.words).sum(dim=1)

    def overlap(self) -> torch.Tensor:
        """Task-by-task Jaccard index ``|S_a & S_b| / |S_a | S_b|``, float32 ``[T, T]`` (1 where both are empty)."""
        w = self.words
        inter = popcount(w.unsqueeze(1) & w.unsqueeze(0)).sum(-1)
        union = popcount(w.unsqueeze(1) | w.unsqueeze(0)).sum(-1)
        jac = inter.double() / union.clamp_min(1).double()
        return torch.where(union == 0, torch.ones_like(jac), jac).float()

    def task(self, t: int) -> PackedMask:
        """The mask of task ``t`` alone (T = 1)."""
        self._check_task(t)
        return PackedMask(self.words[t : t + 1].clone(), self.shapes)

    def to(self, device) -> PackedMask:
        return PackedMask(self.words.to(device), self.shapes)

    def state_dict(self) -> dict:
        """Plain tensors and lists, loadable with ``torch.load(..., weights_only=True)``."""
        return {"words": self.words, "shapes": [list(s) for s in self.shapes]}

    @classmethod
    def from_state_dict(cls, state: dict) -> PackedMask:
        return cls(state["words"], tuple(torch.Size(s) for s in state["shapes"]))

    def save(self, path) -> None:
        torch.save(self.state_dict(), path)

    @classmethod
    def load(cls, path, map_location=None) -> PackedMask:
        return cls.from_state_dict(torch.load(path, map_location=map_location, weights_only=True))

    def __eq__(self, other) -> bool:
        if not isinstance(other, PackedMask):
            return NotImplemented
        return (
            self.shapes == other.shapes
            and self.words.shape == other.words.shape
            and bool(torch.equal(self.words.cpu(), other.words.cpu()))
        )

    def __repr__(self) -> str:
        return f"PackedMask(num_tasks={self.num_tasks}, num_entries={self.num_entries}, ones={self.count().tolist()})"


def popcount(words: torch.Tensor) -> torch.Tensor:
    """Number of set bits of each int32 word of ``words`` (any shape), as int64 of the same shape."""
    x = words.to(torch.int64) & 0xFFFFFFFF
    x = x - ((x >> 1) & 0x55555555)
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F
    return ((x * 0x01010101) & 0xFFFFFFFF) >> 24


# Masks pickled whole before the module was renamed from ``mask`` load under weights_only too.
torch.serialization.add_safe_globals([PackedMask, (PackedMask, "fsmtl_kernels.mask.PackedMask")])
