"""Files written so that a kill at any moment leaves the old file or the new one, never a torn one:
a temporary file in the target's directory, flushed and fsynced, then renamed onto the target
(``os.replace``, atomic on POSIX) and the directory fsynced. An ``OSError`` while writing (a full
disk, a failing device) is re-raised with the final file's name as its ``filename`` and leaves no
temporary file."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class _Watched:
    """A file whose ``write`` remembers the ``OSError`` it raised (for writers that swallow it)."""

    def __init__(self, f) -> None:
        self.f = f
        self.error: OSError | None = None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def __getattr__(self, name):
        return getattr(self.f, name)


def write_atomically(path: str | os.PathLike[str], mode: str, write, *, newline: str | None = None) -> Path:
    """Call ``write(file)`` on a temporary file beside ``path`` (opened with ``mode``), fsync it,
    then ``os.replace`` it onto ``path`` and fsync the directory: a reader (or a kill -9) sees the
    old file or the new one. An ``OSError`` is re-raised with ``filename`` = ``path``."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would hide the file from others: as open() would
        with os.fdopen(fd, mode, newline=newline) as f:
            watched = _Watched(f)
            try:
                write(watched)
            except RuntimeError:
                # torch.save turns the OSError of a failed write of its zip stream into a RuntimeError.
                if watched.error is None:
                    raise
                raise watched.error from None
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        _fsync_dir(path.parent)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
    return path


def atomic_write_bytes(path: str | os.PathLike[str], write) -> Path:
    """:func:`write_atomically` of a binary file."""
    return write_atomically(path, "wb", write)
