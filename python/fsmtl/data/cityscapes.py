"""Cityscapes in the preprocessed MTAN / LibMTL layout: 7-class segmentation and depth (paper, Table 2).

Expected files (the ``.npy`` arrays MTAN's and LibMTL's download scripts produce, usually 128x256)::

    root/train/image/<i>.npy   [H, W, 3] float, RGB in [0, 1]
    root/train/label/<i>.npy   [H, W] float or int, classes 0..6, -1 = ignore
    root/train/depth/<i>.npy   [H, W, 1] float, 0 = invalid pixel
    root/val/{image,label,depth}/<i>.npy   the same for the official validation set

with ``i = 0, 1, 2, ...`` the same in the three folders. The ``val`` folder is our *test* split
(it is what MTAN and LibMTL report on); our validation split is carved from ``train``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..tasks import Task
from ._split import carve_validation, check_fraction, standardize
from .benchmark import Benchmark
from .split import Split

NUM_CLASSES = 7


def _load(path: Path) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"Cityscapes array not found: {path}")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise ValueError(f"{path}: not a readable .npy array ({err})") from err


def _indices(folder: Path) -> list[int]:
    """Sorted integer stems of ``folder/<i>.npy``."""
    if not folder.is_dir():
        raise FileNotFoundError(f"Cityscapes folder not found: {folder}")
    stems = []
    for path in folder.glob("*.npy"):
        if not path.stem.isdigit():
            raise ValueError(f"{path}: Cityscapes arrays must be named <integer>.npy")
        stems.append(int(path.stem))
    if not stems:
        raise ValueError(f"{folder}: no <i>.npy arrays")
    return sorted(stems)


def _read_folder(folder: Path, limit: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(images ``[n, 3, H, W]`` float32, labels ``[n, H, W]`` int64, depth ``[n, 1, H, W]`` float32) of one folder."""
    ids = _indices(folder / "image")
    for sub in ("label", "depth"):
        other = _indices(folder / sub)
        if other != ids:
            raise ValueError(f"{folder / sub}: holds indices {other[:5]}... but {folder / 'image'} holds {ids[:5]}...")
    if limit is not None:
        ids = ids[:limit]
    images, labels, depths = [], [], []
    shape = None
    for i in ids:
        image = _load(folder / "image" / f"{i}.npy")
        label = _load(folder / "label" / f"{i}.npy")
        depth = _load(folder / "depth" / f"{i}.npy")
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"{folder / 'image' / f'{i}.npy'}: expected [H, W, 3], got {image.shape}")
        h, w = image.shape[:2]
        if shape is not None and (h, w) != shape:
            raise ValueError(f"{folder / 'image' / f'{i}.npy'}: size {(h, w)} differs from the first image's {shape}")
        shape = (h, w)
        if label.shape != (h, w):
            raise ValueError(f"{folder / 'label' / f'{i}.npy'}: expected [{h}, {w}], got {label.shape}")
        if depth.shape not in ((h, w, 1), (h, w)):
            raise ValueError(f"{folder / 'depth' / f'{i}.npy'}: expected [{h}, {w}, 1], got {depth.shape}")
        label_int = np.rint(label).astype(np.int64)
        if not np.array_equal(label_int, label) or label_int.min() < -1 or label_int.max() >= NUM_CLASSES:
            raise ValueError(f"{folder / 'label' / f'{i}.npy'}: labels must be integers in -1..{NUM_CLASSES - 1}")
        images.append(image.transpose(2, 0, 1).astype(np.float32))
        labels.append(label_int)
        depths.append(depth.reshape(1, h, w).astype(np.float32))
    return torch.from_numpy(np.stack(images)), torch.from_numpy(np.stack(labels)), torch.from_numpy(np.stack(depths))


def cityscapes(
    root: str | os.PathLike[str], *, seed: int = 0, val_fraction: float = 0.1, limit: int | None = None
) -> Benchmark:
    """Cityscapes: homogeneous, tasks ``segmentation`` (7 classes) and ``depth``.

    Args:
        root: folder holding ``train/`` and ``val/`` (see the module docstring).
        seed: seeds the validation split carved from ``train``.
        val_fraction: share of ``train`` held out as our validation split.
        limit: read at most the first ``limit`` arrays of each folder (for quick runs).

    Returns:
        Benchmark ``"cityscapes"``: inputs float32 ``[n, 3, H, W]`` standardized per channel with
        train statistics (the same tensor for both tasks); segmentation targets int64 ``[n, H, W]``
        with -1 = ignore; depth targets float32 ``[n, 1, H, W]`` with 0 = invalid, unscaled.
    """
    val_fraction = check_fraction(val_fraction, "val_fraction")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 2):
        raise ValueError(f"limit must be None or an int >= 2, got {limit!r}")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"Cityscapes root not found: {root}")
    train_x, train_seg, train_depth = _read_folder(root / "train", limit)
    test_x, test_seg, test_depth = _read_folder(root / "val", limit)
    if train_x.shape[1:] != test_x.shape[1:]:
        raise ValueError(
            f"{root}: train images are {tuple(train_x.shape[2:])} but val images {tuple(test_x.shape[2:])}"
        )
    tr, va = carve_validation(train_x.shape[0], val_fraction=val_fraction, seed=seed)
    xs = standardize(train_x[tr], train_x[va], test_x, dims=(0, 2, 3))
    targets = [
        (train_seg[tr], train_depth[tr]),
        (train_seg[va], train_depth[va]),
        (test_seg, test_depth),
    ]
    splits = [
        Split(inputs=[x, x], targets=[seg.contiguous(), depth.contiguous()])
        for x, (seg, depth) in zip(xs, targets, strict=True)
    ]
    return Benchmark(
        name="cityscapes",
        tasks=[Task("segmentation", "segmentation", NUM_CLASSES), Task("depth", "depth", 1)],
        homogeneous=True,
        input_shape=tuple(train_x.shape[1:]),
        train=splits[0],
        val=splits[1],
        test=splits[2],
        sources={"train": str(root / "train"), "val": str(root / "train"), "test": str(root / "val")},
    )


class CityscapesDataset(torch.utils.data.Dataset):
    """Cityscapes arrays read on the fly (three ``.npy`` files per item), for ``Trainer.fit`` with
    ``num_workers``: item ``i`` is ``(image [3, H, W] float32 in [0, 1], [segmentation [H, W]
    int64 with -1 = ignore, depth [1, H, W] float32 with 0 = invalid])``. Images are not
    standardized (the in-memory :func:`cityscapes` standardizes with train statistics)."""

    def __init__(self, folder: str | os.PathLike[str], ids: list[int]) -> None:
        self.folder, self.ids = Path(folder), list(ids)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int):
        name = f"{self.ids[i]}.npy"
        image = _load(self.folder / "image" / name)
        h, w = image.shape[:2]
        label = np.rint(_load(self.folder / "label" / name)).astype(np.int64)
        depth = _load(self.folder / "depth" / name).reshape(1, h, w).astype(np.float32)
        return (
            torch.from_numpy(image.transpose(2, 0, 1).astype(np.float32)),
            [torch.from_numpy(label), torch.from_numpy(depth)],
        )


def cityscapes_datasets(
    root: str | os.PathLike[str], *, seed: int = 0, val_fraction: float = 0.1, limit: int | None = None
) -> tuple[list[Task], dict[str, CityscapesDataset]]:
    """The tasks and the same train/val/test split as :func:`cityscapes`, as lazily read
    :class:`CityscapesDataset` s (the label and depth folders must hold the image folder's indices)."""
    val_fraction = check_fraction(val_fraction, "val_fraction")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"Cityscapes root not found: {root}")
    ids = {}
    for split in ("train", "val"):
        ids[split] = _indices(root / split / "image")
        for sub in ("label", "depth"):
            if _indices(root / split / sub) != ids[split]:
                raise ValueError(f"{root / split / sub}: holds other indices than {root / split / 'image'}")
        ids[split] = ids[split][:limit] if limit is not None else ids[split]
    tr, va = carve_validation(len(ids["train"]), val_fraction=val_fraction, seed=seed)
    datasets = {
        "train": CityscapesDataset(root / "train", [ids["train"][i] for i in tr]),
        "val": CityscapesDataset(root / "train", [ids["train"][i] for i in va]),
        "test": CityscapesDataset(root / "val", ids["val"]),
    }
    return [Task("segmentation", "segmentation", NUM_CLASSES), Task("depth", "depth", 1)], datasets
