"""MNIST-format IDX files and the DKL-mnist benchmark (MNIST digits, KMNIST, EMNIST letters).

IDX format (http://yann.lecun.com/exdb/mnist/): a 4-byte magic number ``0x00 0x00 <dtype> <ndim>``,
then ``ndim`` big-endian uint32 dimension sizes, then the data in C order, big-endian. MNIST
images are ``0x00000803`` (ubyte, 3 dims ``[n, 28, 28]``), labels ``0x00000801`` (ubyte, ``[n]``).
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

from ..tasks import Task
from ._split import carve_validation, check_fraction
from .benchmark import Benchmark
from .split import Split

# IDX dtype code -> numpy big-endian dtype.
_IDX_DTYPES: dict[int, str] = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_GZIP_MAGIC = b"\x1f\x8b"


def read_idx(path: str | os.PathLike[str]) -> torch.Tensor:
    """Read one IDX file (optionally gzip-compressed) into a tensor.

    Args:
        path: the file; gzip is detected from its first bytes, whatever its name.

    Returns:
        A tensor of the file's shape: uint8 for ubyte data (MNIST images ``[n, 28, 28]`` and labels
        ``[n]``), else int8 / int16 / int32 / float32 / float64 as the file says.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: bad magic number, unknown dtype, corrupt gzip, or a size that disagrees with the
            header (truncated or trailing bytes); the message names the path.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IDX file not found: {path}")
    raw = path.read_bytes()
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as err:
            raise ValueError(f"{path}: corrupt gzip data ({err})") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an IDX file (magic number must start with two zero bytes, got {raw[:4].hex()})")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX data type code 0x{code:02x}")
    if ndim == 0:
        raise ValueError(f"{path}: IDX header declares 0 dimensions")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes for {ndim} dimensions)")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(
            f"{path}: IDX header declares shape {shape} ({expected} data bytes) but the file holds {len(raw) - header}"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return torch.from_numpy(data.astype(dtype.newbyteorder("="), copy=True))


def _find(directory: Path, name: str) -> Path:
    """``directory/name`` or ``directory/name.gz``, whichever exists."""
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"missing {directory / name} (or {name}.gz) in {directory}")


def _read_pair(directory: Path, prefix: str, split: str, num_classes: int, label_offset: int) -> tuple:
    """Images ``[n, 28, 28]`` uint8 and labels ``[n]`` int64 (after ``- label_offset``) of one split."""
    images_path = _find(directory, f"{prefix}{split}-images-idx3-ubyte")
    labels_path = _find(directory, f"{prefix}{split}-labels-idx1-ubyte")
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.dim() != 3 or images.dtype != torch.uint8:
        raise ValueError(f"{images_path}: expected ubyte images [n, H, W], got {images.dtype} {tuple(images.shape)}")
    if labels.dim() != 1:
        raise ValueError(f"{labels_path}: expected labels [n], got shape {tuple(labels.shape)}")
    if labels.shape[0] != images.shape[0]:
        raise ValueError(f"{labels_path} has {labels.shape[0]} labels but {images_path} has {images.shape[0]} images")
    if images.shape[0] == 0:
        raise ValueError(f"{images_path}: holds no images (a well-formed but empty file)")
    labels = labels.to(torch.int64) - label_offset
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"{labels_path}: labels must be in [{label_offset}, {num_classes + label_offset}), "
            f"got [{int(labels.min()) + label_offset}, {int(labels.max()) + label_offset}]"
        )
    return images, labels, f"{images_path}, {labels_path}"


def _limit(labels: torch.Tensor, limit: int | None, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of at most ``limit`` samples drawn at random (all samples when ``limit`` is None)."""
    n = labels.shape[0]
    if limit is None or limit >= n:
        return np.arange(n)
    return np.sort(rng.choice(n, size=limit, replace=False))


def dkl_mnist(
    mnist_dir: str | os.PathLike[str],
    kmnist_dir: str | os.PathLike[str],
    emnist_letters_dir: str | os.PathLike[str],
    *,
    seed: int = 0,
    val_fraction: float = 1 / 6,
    limit: int | None = None,
    flatten: bool = False,
) -> Benchmark:
    """DKL-mnist: heterogeneous, 3 multiclass tasks, each with its own images (paper, Table 1).

    Expected files (each may also be gzip-compressed with a ``.gz`` suffix)::

        mnist_dir/          train-images-idx3-ubyte  train-labels-idx1-ubyte
                            t10k-images-idx3-ubyte   t10k-labels-idx1-ubyte
        kmnist_dir/         the same four names (KMNIST's MNIST-format release)
        emnist_letters_dir/ emnist-letters-train-images-idx3-ubyte  emnist-letters-train-labels-idx1-ubyte
                            emnist-letters-test-images-idx3-ubyte   emnist-letters-test-labels-idx1-ubyte

    Tasks: ``mnist`` (10 classes), ``kmnist`` (10 classes), ``emnist_letters`` (26 classes; the
    files' labels 1..26 become 0..25, and the images, stored transposed in EMNIST, are transposed
    back to upright). Test = each data set's test files; val = ``val_fraction`` of each train set
    (stratified where every class fits, seeded). Pixels are scaled to [0, 1] and standardized with
    one mean and std pooled over the three train sets.

    Args:
        seed: seeds the validation split and the ``limit`` subsampling.
        val_fraction: share of each train set held out for validation.
        limit: keep at most this many train (before the val split) and this many test images per
            task, drawn at random; None keeps all (~60k-125k train images per task).
        flatten: inputs ``[n, 784]`` instead of ``[n, 1, 28, 28]``.

    Returns:
        Benchmark ``"dkl-mnist"``: inputs float32 ``[n_t, 1, 28, 28]``, targets int64 ``[n_t]``.
    """
    val_fraction = check_fraction(val_fraction, "val_fraction")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 10):
        raise ValueError(f"limit must be None or an int >= 10, got {limit!r}")
    sources = [
        ("mnist", Path(mnist_dir), "", 10, 0, False),
        ("kmnist", Path(kmnist_dir), "", 10, 0, False),
        ("emnist_letters", Path(emnist_letters_dir), "emnist-letters-", 26, 1, True),
    ]
    for _, directory, *_ in sources:
        if not directory.is_dir():
            raise FileNotFoundError(f"data directory not found: {directory}")
    rng = np.random.default_rng(seed)
    tasks, parts, files = [], [], {}
    for t, (name, directory, prefix, num_classes, offset, transposed) in enumerate(sources):
        tr_x, tr_y, files[f"train/{name}"] = _read_pair(directory, prefix, "train", num_classes, offset)
        te_x, te_y, files[f"test/{name}"] = _read_pair(
            directory, prefix, "t10k" if prefix == "" else "test", num_classes, offset
        )
        files[f"val/{name}"] = files[f"train/{name}"]
        if tr_x.shape[1:] != te_x.shape[1:] or tuple(tr_x.shape[1:]) != (28, 28):
            raise ValueError(
                f"{directory}: images must be 28x28, got train {tuple(tr_x.shape[1:])} and test {tuple(te_x.shape[1:])}"
            )
        keep_tr, keep_te = _limit(tr_y, limit, rng), _limit(te_y, limit, rng)
        tr_x, tr_y, te_x, te_y = tr_x[keep_tr], tr_y[keep_tr], te_x[keep_te], te_y[keep_te]
        if transposed:
            tr_x, te_x = tr_x.transpose(1, 2), te_x.transpose(1, 2)
        train_idx, val_idx = carve_validation(
            len(tr_y), val_fraction=val_fraction, seed=seed + t, stratify=tr_y.numpy()
        )
        parts.append(((tr_x[train_idx], tr_y[train_idx]), (tr_x[val_idx], tr_y[val_idx]), (te_x, te_y)))
        tasks.append(Task(name, "multiclass", num_classes))
    # One scalar mean/std over all train pixels of the three tasks: the shared trunk sees one input scale.
    train_pixels = torch.cat([p[0][0].reshape(-1) for p in parts]).to(torch.float64) / 255.0
    mean, std = float(train_pixels.mean()), float(train_pixels.std())
    shape: tuple[int, ...] = (784,) if flatten else (1, 28, 28)

    def convert(images: torch.Tensor) -> torch.Tensor:
        x = (images.to(torch.float32) / 255.0 - mean) / std
        return x.reshape(images.shape[0], *shape).contiguous()

    splits = [
        Split(inputs=[convert(p[s][0]) for p in parts], targets=[p[s][1].contiguous() for p in parts]) for s in range(3)
    ]
    return Benchmark(
        name="dkl-mnist",
        tasks=tasks,
        homogeneous=False,
        input_shape=shape,
        train=splits[0],
        val=splits[1],
        test=splits[2],
        sources=files,
    )
