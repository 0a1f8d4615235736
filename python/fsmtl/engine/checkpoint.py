"""Checkpoint files: atomic writes, keep-last-K, finding the latest readable one, and the stop
request that SIGINT/SIGTERM set.

A checkpoint is written to a temporary file in the target directory, flushed and fsynced, then
renamed over its final name with ``os.replace`` (atomic on POSIX) and the directory is fsynced.
So a process killed at any moment (``kill -9`` included) leaves either the previous checkpoints
or the new one, never a truncated file under a checkpoint name; leftover ``*.tmp`` files are
ignored and removed on the next write. An ``OSError`` while writing (a full disk, a failing
device) is re-raised with the final file's name as its ``filename`` and leaves no temporary file.

Every ``torch.save`` file written here (:func:`atomic_save`: checkpoints, finished results) ends
with a trailer holding the SHA-256 of its bytes; :func:`load_verified` checks it before loading, so
that damage the unpickler would not notice (a flipped byte inside a tensor, or a digit of a
counter) is found as surely as a truncated file or garbage bytes. Reading back (:func:`latest`)
skips any checkpoint that fails, whatever the damage (truncated, garbage, altered, not a Trainer
state), with a warning naming it, and takes the next older one; when none loads, the warning says
that training restarts from step 0.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
import warnings
from pathlib import Path

import torch

from ..files import write_atomically

PATTERN = re.compile(r"^ckpt-(\d{9})\.pt$")

#: Ends every file of :func:`atomic_save`, followed by the hex SHA-256 of the bytes before it and "\n".
TRAILER = b"\nfsmtl-sha256:"
_TRAILER_SIZE = len(TRAILER) + 64 + 1

STOP = threading.Event()
"""Set by the SIGINT/SIGTERM handler of :func:`fsmtl.run.resume.stop_on_signals`; a Trainer checks it
after every step and, when set, writes a checkpoint and raises :class:`TrainingInterrupted`."""


class TrainingInterrupted(Exception):
    """Training stopped on request after a completed step (its checkpoint, if any, is written)."""


def atomic_save(obj, path: str | os.PathLike[str]) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (tmp file in the same dir, fsync, ``os.replace``),
    followed by the :data:`TRAILER` with the SHA-256 of the saved bytes."""

    def save(f) -> None:
        hashing = _Hashing(f)
        torch.save(obj, hashing)
        f.write(TRAILER + hashing.digest.hexdigest().encode() + b"\n")

    return write_atomically(path, "wb", save)


class _Hashing:
    """A binary file that hashes what is written to it."""

    def __init__(self, f) -> None:
        self.f = f
        self.digest = hashlib.sha256()

    def write(self, data):
        self.digest.update(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)


def load_verified(path: str | os.PathLike[str], map_location=None):
    """The object :func:`atomic_save` wrote to ``path``, after checking its SHA-256 trailer;
    ``ValueError`` ``"<path> is unreadable (<why>)"`` for any damage."""
    path = Path(path)
    try:
        size = path.stat().st_size
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            f.seek(max(0, size - _TRAILER_SIZE))
            tail = f.read()
            if size < _TRAILER_SIZE or not tail.startswith(TRAILER) or not tail.endswith(b"\n"):
                why = "empty" if size == 0 else "no checksum trailer: truncated, or not written by fsmtl"
                raise ValueError(f"{path} is unreadable ({why})")
            f.seek(0)
            left = size - _TRAILER_SIZE
            while left:
                chunk = f.read(min(left, 1 << 22))
                if not chunk:
                    break
                digest.update(chunk)
                left -= len(chunk)
    except OSError as exc:
        raise ValueError(f"{path} is unreadable ({exc.strerror or exc})") from None
    if digest.hexdigest().encode() != tail[len(TRAILER) : -1]:
        raise ValueError(f"{path} is unreadable (checksum mismatch: its bytes changed after it was written)")
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # noqa: BLE001 (the unpickler raises anything on data it cannot read)
        cause = str(exc).splitlines()[0] if str(exc) else ""
        raise ValueError(f"{path} is unreadable ({type(exc).__name__}{': ' + cause if cause else ''})") from None


def atomic_write_text(text: str, path: str | os.PathLike[str]) -> Path:
    """Write ``text`` to ``path`` atomically, as :func:`atomic_save`."""
    return write_atomically(path, "w", lambda f: f.write(text))


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


def read_state(path: Path, map_location=None) -> dict:
    """The Trainer state in checkpoint ``path``; ``ValueError`` naming the file and the damage when
    it does not load or holds something else (any exception of the unpickler counts as damage)."""
    state = load_verified(path, map_location)
    if not isinstance(state, dict) or "version" not in state:
        raise ValueError(f"{path} is unreadable (holds a {type(state).__name__}, not a fsmtl Trainer state)")
    return state


def latest(directory: str | os.PathLike[str], map_location=None) -> tuple[Path, dict] | None:
    """``(path, state)`` of the newest checkpoint of ``directory`` that loads, or None when there is
    none. A checkpoint that does not load is skipped with a warning naming it (the disk lost
    data, or someone wrote there); when there were checkpoints but none loads, a warning says
    that training restarts from step 0."""
    found = checkpoints(directory)
    for path in reversed(found):
        try:
            return path, read_state(path, map_location)
        except ValueError as exc:
            warnings.warn(f"{exc}; skipped, trying the next older checkpoint", UserWarning, stacklevel=2)
    if found:
        warnings.warn(
            f"none of the {len(found)} checkpoint(s) in {directory} is readable: training restarts from step 0",
            UserWarning,
            stacklevel=2,
        )
    return None


def load_latest(directory: str | os.PathLike[str], map_location=None) -> dict | None:
    """The state of the newest checkpoint of ``directory`` that loads (see :func:`latest`), or None."""
    found = latest(directory, map_location)
    return None if found is None else found[1]


def resume(trainer, directory) -> bool:
    """``Trainer.resume``: load the newest readable checkpoint of ``directory`` into ``trainer``;
    False when there is none. A checkpoint of another run is refused (``ValueError`` naming the
    file and each differing setting), not skipped."""
    found = latest(directory, map_location="cpu")
    if found is None:
        return False
    path, state = found
    try:
        trainer.load_state_dict(state)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    return True
