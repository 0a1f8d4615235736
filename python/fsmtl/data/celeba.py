"""CelebA: homogeneous binary attribute tasks chosen by name (paper, Table 1).

Expected files (the official release)::

    list_attr_celeba.txt       line 1: number of images N
                               line 2: the 40 attribute names, space-separated
                               then N lines: "<image file> v_1 ... v_40" with v in {-1, 1}
    img_align_celeba/          the images named in the attribute file (e.g. 000001.jpg)
    list_eval_partition.txt    optional: "<image file> p" with p = 0 train, 1 val, 2 test
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..tasks import Task
from ._split import check_fraction, standardize, three_way_split
from .benchmark import Benchmark
from .split import Split


def read_attributes(attr_file: str | os.PathLike[str]) -> tuple[list[str], list[str], np.ndarray]:
    """Parse ``list_attr_celeba.txt``.

    Returns:
        (attribute names, image file names, values ``[N, A]`` int8 in {-1, 1}).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: a malformed header or row (message names the path and the line).
    """
    path = Path(attr_file)
    if not path.is_file():
        raise FileNotFoundError(f"CelebA attribute file not found: {path}")
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if len(lines) < 2:
        raise ValueError(f"{path}: expected a count line and an attribute-name line, got {len(lines)} lines")
    try:
        count = int(lines[0].strip())
    except ValueError as err:
        raise ValueError(f"{path}: line 1 must be the number of images, got {lines[0].strip()!r}") from err
    names = lines[1].split()
    rows = lines[2:]
    if count != len(rows):
        raise ValueError(f"{path}: header says {count} images but the file has {len(rows)} rows")
    if count == 0:
        raise ValueError(f"{path}: holds no images (a well-formed but empty file)")
    files, values = [], np.empty((count, len(names)), dtype=np.int8)
    for i, row in enumerate(rows):
        fields = row.split()
        if len(fields) != len(names) + 1:
            raise ValueError(
                f"{path} line {i + 3}: expected a file name and {len(names)} values, got {len(fields)} fields"
            )
        try:
            row_values = [int(v) for v in fields[1:]]
        except ValueError as err:
            raise ValueError(f"{path} line {i + 3}: attribute values must be -1 or 1 ({err})") from err
        if any(v not in (-1, 1) for v in row_values):
            raise ValueError(f"{path} line {i + 3}: attribute values must be -1 or 1")
        files.append(fields[0])
        values[i] = row_values
    return names, files, values


def read_partition(partition_file: str | os.PathLike[str], files: Sequence[str]) -> np.ndarray:
    """Partition (0 train, 1 val, 2 test) ``[len(files)]`` int64 of each image, from ``list_eval_partition.txt``."""
    path = Path(partition_file)
    if not path.is_file():
        raise FileNotFoundError(f"CelebA partition file not found: {path}")
    table: dict[str, int] = {}
    for i, row in enumerate(path.read_text().splitlines()):
        if not row.strip():
            continue
        fields = row.split()
        if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
            raise ValueError(f"{path} line {i + 1}: expected '<image file> <0|1|2>', got {row.strip()!r}")
        table[fields[0]] = int(fields[1])
    missing = [f for f in files if f not in table]
    if missing:
        raise ValueError(f"{path}: no partition for {len(missing)} image(s), e.g. {missing[0]}")
    return np.array([table[f] for f in files], dtype=np.int64)


def _load_image(path: Path, image_size: int) -> np.ndarray:
    """One image as ``[3, image_size, image_size]`` float32 in [0, 1]: centre square crop, then resize."""
    return _load_image_uint8(path, image_size).astype(np.float32) / 255.0


def _load_image_uint8(path: Path, image_size: int) -> np.ndarray:
    """One image as ``[3, image_size, image_size]`` uint8: centre square crop, then resize."""
    from PIL import Image, UnidentifiedImageError  # Pillow comes with matplotlib; only CelebA needs it

    if not path.is_file():
        raise FileNotFoundError(f"CelebA image not found: {path}")
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            width, height = image.size
            side = min(width, height)
            left, top = (width - side) // 2, (height - side) // 2
            image = image.crop((left, top, left + side, top + side))
            image = image.resize((image_size, image_size), Image.Resampling.BILINEAR)
            array = np.asarray(image, dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"{path}: cannot read image ({err})") from err
    return array.transpose(2, 0, 1)


def celeba(
    attr_file: str | os.PathLike[str],
    image_dir: str | os.PathLike[str],
    attributes: Sequence[str],
    *,
    image_size: int = 64,
    limit: int | None = None,
    partition_file: str | os.PathLike[str] | None = None,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
) -> Benchmark:
    """CelebA as a homogeneous multi-label benchmark: one binary task per chosen attribute.

    Args:
        attr_file: ``list_attr_celeba.txt``.
        image_dir: folder of the images named in ``attr_file`` (``img_align_celeba``).
        attributes: attribute names, e.g. ``["Smiling", "Male", "Young", ...]``; one task each, in this order.
        image_size: side of the square images after a centre crop and a bilinear resize.
        limit: load at most this many images, drawn at random (seeded) from the file, since all
            202,599 at 64x64 take ~10 GB as float32; None loads all.
        partition_file: ``list_eval_partition.txt``; when given, each image keeps its official
            split, else a random ``1 - val - test`` / ``val`` / ``test`` split (seeded).
        seed: seeds ``limit`` and the random split.
        val_fraction, test_fraction: random-split shares (ignored with a partition file).

    Returns:
        Benchmark ``"celeba"``: inputs float32 ``[n, 3, image_size, image_size]`` standardized per
        channel with train statistics, the same tensor for every task; targets float32 ``[n]`` in
        {0, 1} (1 = the file's 1).
    """
    image_dir, files, labels, parts = _index(
        attr_file, image_dir, attributes, image_size, limit, partition_file, seed, val_fraction, test_fraction
    )
    images = torch.from_numpy(np.stack([_load_image(image_dir / f, image_size) for f in files]))
    xs = standardize(*(images[p] for p in parts), dims=(0, 2, 3))
    tasks = [Task(a, "binary", 1) for a in attributes]
    splits = [
        Split(inputs=[x] * len(tasks), targets=[labels[p, j].contiguous() for j in range(len(tasks))])
        for x, p in zip(xs, parts, strict=True)
    ]
    return Benchmark(
        name="celeba",
        tasks=tasks,
        homogeneous=True,
        input_shape=(3, image_size, image_size),
        train=splits[0],
        val=splits[1],
        test=splits[2],
        sources={"*": f"{attr_file}, images in {image_dir}"},
    )


def _index(attr_file, image_dir, attributes, image_size, limit, partition_file, seed, val_fraction, test_fraction):
    """The checked arguments' image folder, chosen files, labels ``[n, T]`` and train/val/test positions."""
    if isinstance(attributes, str) or not isinstance(attributes, Sequence) or len(attributes) == 0:
        raise ValueError("attributes must be a non-empty sequence of attribute names")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 3):
        raise ValueError(f"limit must be None or an int >= 3, got {limit!r}")
    val_fraction = check_fraction(val_fraction, "val_fraction")
    test_fraction = check_fraction(test_fraction, "test_fraction")
    if len(set(attributes)) != len(attributes):
        raise ValueError(f"attributes must be distinct, got {list(attributes)}")
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise FileNotFoundError(f"CelebA image folder not found: {image_dir}")
    names, files, values = read_attributes(attr_file)
    unknown = [a for a in attributes if a not in names]
    if unknown:
        raise ValueError(f"{attr_file}: unknown attribute(s) {unknown}; the file has {names}")
    columns = [names.index(a) for a in attributes]
    rng = np.random.default_rng(seed)
    keep = np.arange(len(files))
    if limit is not None and limit < len(files):
        keep = np.sort(rng.choice(len(files), size=limit, replace=False))
    files = [files[i] for i in keep]
    labels = torch.from_numpy((values[keep][:, columns] > 0).astype(np.float32))
    if partition_file is not None:
        partition = read_partition(partition_file, files)
        parts = tuple(np.flatnonzero(partition == p) for p in range(3))
        for p, part in zip(("train", "val", "test"), parts, strict=True):
            if len(part) == 0:
                raise ValueError(f"{partition_file}: the {p} partition holds none of the selected images")
    else:
        parts = three_way_split(len(files), val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
    return image_dir, files, labels, parts


class CelebADataset(torch.utils.data.Dataset):
    """CelebA images decoded on the fly (for ``Trainer.fit`` with ``num_workers``): item ``i`` is
    ``(image, targets)``, the image uint8 ``[3, image_size, image_size]`` (the Trainer makes it
    float32 in [0, 1] on the device), targets T float32 scalars in {0, 1}. Nothing is held in memory
    but file names and labels, so all 202,599 images need no 10 GB of float32."""

    def __init__(self, image_dir: Path, files: Sequence[str], labels: torch.Tensor, image_size: int) -> None:
        self.image_dir, self.files, self.labels, self.image_size = Path(image_dir), list(files), labels, image_size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        # A copy: the array is a read-only view of the PIL image buffer.
        image = torch.from_numpy(_load_image_uint8(self.image_dir / self.files[i], self.image_size).copy())
        return image, list(self.labels[i].unbind())


def celeba_datasets(
    attr_file: str | os.PathLike[str],
    image_dir: str | os.PathLike[str],
    attributes: Sequence[str],
    *,
    image_size: int = 64,
    limit: int | None = None,
    partition_file: str | os.PathLike[str] | None = None,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
) -> tuple[list[Task], dict[str, CelebADataset]]:
    """The same images, labels and split as :func:`celeba`, as lazily decoded datasets: returns the
    tasks and ``{"train", "val", "test"}`` :class:`CelebADataset`s (inputs in [0, 1], not
    standardized)."""
    image_dir, files, labels, parts = _index(
        attr_file, image_dir, attributes, image_size, limit, partition_file, seed, val_fraction, test_fraction
    )
    datasets = {
        name: CelebADataset(image_dir, [files[i] for i in part], labels[part], image_size)
        for name, part in zip(("train", "val", "test"), parts, strict=True)
    }
    return [Task(a, "binary", 1) for a in attributes], datasets
