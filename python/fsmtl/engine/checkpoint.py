"""Checkpoint files: atomic writes, keep-last-K, finding the latest readable one, and the stop
request that SIGINT/SIGTERM set.

A checkpoint is written to a temporary file in the target directory, flushed and fsynced, then
renamed over its final name with ``os.replace`` (atomic on POSIX) and the directory is fsynced.
So a process killed at any moment (``kill -9`` included) leaves either the previous checkpoints
or the new one, never a truncated file under a checkpoint name; leftover ``*.tmp`` files are
ignored and removed on the next write.
"""

from __future__ import annotations

import os
import re
import tempfile
import threading
from pathlib import Path

import torch

PATTERN = re.compile(r"^ckpt-(\d{9})\.pt$")

STOP = threading.Event()
"""Set by the SIGINT/SIGTERM handler of :func:`fsmtl.run.resume.stop_on_signals`; a Trainer checks it
after every step and, when set, writes a checkpoint and raises :class:`TrainingInterrupted`."""


class TrainingInterrupted(Exception):
    """Training stopped on request after a completed step (its checkpoint, if any, is written)."""


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: str | os.PathLike[str], mode: str, write) -> Path:
    """Call ``write(file)`` on a temporary file beside ``path``, fsync it, then ``os.replace`` it onto
    ``path`` and fsync the directory: a reader (or a kill -9) sees the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_save(obj, path: str | os.PathLike[str]) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (tmp file in the same dir, fsync, ``os.replace``)."""
    return _atomic_write(path, "wb", lambda f: torch.save(obj, f))


def atomic_write_text(text: str, path: str | os.PathLike[str]) -> Path:
    """Write ``text`` to ``path`` atomically, as :func:`atomic_save`."""
    return _atomic_write(path, "w", lambda f: f.write(text))


def checkpoints(directory: str | os.PathLike[str]) -> list[Path]:
    """The ``ckpt-<step>.pt`` files of ``directory``, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := PATTERN.match(p.name))]
    return [p for _, p in sorted(found)]


def save_checkpoint(state: dict, directory: str | os.PathLike[str], step: int, *, keep_last: int = 3) -> Path:
    """Write ``state`` as ``directory/ckpt-<step>.pt`` atomically; keep the newest ``keep_last``."""
    if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1:
        raise ValueError(f"keep_last must be a positive int, got {keep_last!r}")
    directory = Path(directory)
    for stale in directory.glob(".ckpt-*.tmp") if directory.is_dir() else ():
        stale.unlink(missing_ok=True)  # from a process killed mid-write
    path = atomic_save(state, directory / f"ckpt-{step:09d}.pt")
    for old in checkpoints(directory)[:-keep_last]:
        old.unlink(missing_ok=True)
    return path


def load_latest(directory: str | os.PathLike[str], map_location=None) -> dict | None:
    """The newest checkpoint of ``directory`` that loads, or None when there is none."""
    for path in reversed(checkpoints(directory)):
        try:
            return torch.load(path, map_location=map_location, weights_only=False)
        except (EOFError, RuntimeError, OSError, ValueError):
            # Unreachable with atomic writes unless the disk lost data; fall back to the previous one.
            continue
    return None
