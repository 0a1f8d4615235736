"""PackedMask: layout (owned here, computed once), round trips, cached unpacking, counts, overlap, saving."""

import sys
import types

import pytest
import torch

import fsmtl_kernels as fk
from fsmtl_kernels.packed_mask import pack_bits, unpack_bits, word_layout


def random_masks(shapes, num_tasks, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.rand((num_tasks, *s), generator=gen) < 0.4 for s in shapes]


SHAPES = [(1,), (31,), (32,), (33,), (3, 7), (2, 3, 11), (64,)]


def test_word_layout_starts_each_parameter_on_a_word():
    offsets, total = word_layout([1, 32, 33, 64, 0])
    assert offsets == [0, 1, 2, 4, 6] and total == 6


def test_documented_bit_order():
    bits = torch.zeros(1, 40, dtype=torch.bool)
    bits[0, [0, 3, 31, 33]] = True
    words = pack_bits(bits)
    assert words.dtype == torch.int32
    assert words[0, 0].item() == (1 | (1 << 3)) - 2**31  # bit 31 set: negative int32
    assert words[0, 1].item() == 1 << 1
    assert torch.equal(unpack_bits(words, 40), bits)


@pytest.mark.parametrize("num_tasks", [1, 3, 8])
def test_round_trip_stacked_and_per_task(num_tasks):
    masks = random_masks(SHAPES, num_tasks)
    packed = fk.PackedMask.from_bool_stacked(masks)
    assert packed.words.shape == (num_tasks, word_layout([torch.Size(s).numel() for s in SHAPES])[1])
    for a, b in zip(packed.to_bool_stacked(), masks):
        assert torch.equal(a, b)
    for t in range(num_tasks):
        single = fk.PackedMask.from_bool([m[t] for m in masks])
        assert single == packed.task(t)
        assert all(torch.equal(a, m[t]) for a, m in zip(packed.to_bool(t), masks))
    assert packed.count().tolist() == [int(sum(m[t].sum() for m in masks)) for t in range(num_tasks)]


def test_overlap_is_jaccard():
    a = torch.tensor([1, 1, 0, 0, 1], dtype=torch.bool)
    b = torch.tensor([0, 1, 1, 0, 1], dtype=torch.bool)
    empty = torch.zeros(5, dtype=torch.bool)
    packed = fk.PackedMask.from_bool_stacked([torch.stack([a, b, empty])])
    expected = torch.tensor([[1.0, 2 / 4, 0.0], [2 / 4, 1.0, 0.0], [0.0, 0.0, 1.0]])
    torch.testing.assert_close(packed.overlap(), expected)


def test_save_and_load(tmp_path):
    packed = fk.PackedMask.from_bool_stacked(random_masks(SHAPES, 3, seed=1))
    packed.save(tmp_path / "m.pt")
    assert fk.PackedMask.load(tmp_path / "m.pt") == packed
    packed.to_bool_stacked()  # the cache is not saved
    torch.save(packed, tmp_path / "obj.pt")
    loaded = torch.load(tmp_path / "obj.pt", weights_only=True)
    assert loaded == packed and loaded.word_offsets == packed.word_offsets
    assert all(torch.equal(a, b) for a, b in zip(loaded.to_bool_stacked(), packed.to_bool_stacked()))


def test_masks_pickled_under_the_old_module_name_load(tmp_path, monkeypatch):
    """Masks saved whole while the class lived in ``fsmtl_kernels.mask`` still load with weights_only."""
    packed = fk.PackedMask.from_bool_stacked(random_masks(SHAPES, 2, seed=4))
    old_module = types.ModuleType("fsmtl_kernels.mask")
    old_module.PackedMask = fk.PackedMask
    monkeypatch.setitem(sys.modules, "fsmtl_kernels.mask", old_module)
    monkeypatch.setattr(fk.PackedMask, "__module__", "fsmtl_kernels.mask")
    torch.save(packed, tmp_path / "old.pt")
    monkeypatch.undo()
    assert "fsmtl_kernels.mask" not in sys.modules
    assert b"fsmtl_kernels.mask" in (tmp_path / "old.pt").read_bytes()
    assert torch.load(tmp_path / "old.pt", weights_only=True) == packed


def test_word_offsets_are_the_layout_computed_once():
    shapes = [(1,), (32,), (33,), (64,), (0,)]
    packed = fk.PackedMask(torch.zeros(2, 6, dtype=torch.int32), shapes)
    assert packed.word_offsets == word_layout([1, 32, 33, 64, 0])[0] == [0, 1, 2, 4, 6]
    packed.word_offsets.append(99)  # a copy: the mask's offsets cannot be changed from outside
    assert packed.word_offsets == [0, 1, 2, 4, 6]


def test_to_bool_stacked_is_unpacked_once_and_shared():
    packed = fk.PackedMask.from_bool_stacked(random_masks(SHAPES, 3, seed=2))
    first, second = packed.to_bool_stacked(), packed.to_bool_stacked()
    assert first is not second and all(a is b for a, b in zip(first, second))
    assert all(t.data_ptr() == f[1].data_ptr() for t, f in zip(packed.to_bool(1), first))
    # A mask built from the same words (e.g. moved) has its own cache.
    assert all(a is not b for a, b in zip(packed.to("cpu").to_bool_stacked(), first))


def test_constructor_and_accessors_reject_bad_input():
    with pytest.raises(TypeError, match="words"):
        fk.PackedMask(torch.zeros(1, 1, dtype=torch.int64), ((3,),))
    with pytest.raises(ValueError, match="words"):
        fk.PackedMask(torch.zeros(1, 2, dtype=torch.int32), ((3,),))
    with pytest.raises(TypeError, match="masks\\[0\\]"):
        fk.PackedMask.from_bool([torch.ones(3)])
    packed = fk.PackedMask.from_bool([torch.ones(3, dtype=torch.bool)])
    with pytest.raises(ValueError, match="task"):
        packed.to_bool(1)
    with pytest.raises(TypeError, match="task"):
        packed.to_bool(True)
