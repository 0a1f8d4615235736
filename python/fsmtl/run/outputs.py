"""Writing what ``fsmtl run`` produces, so that nothing finished is lost and nothing is torn.

* **Atomic files.** Every output (``table.txt``, ``results.csv``, the figures, ``results.json``)
  is written to a temporary file in its directory, fsynced and renamed over its final name
  (:mod:`fsmtl.engine.checkpoint`), ``results.json`` last: a directory holding ``results.json``
  holds the complete results; a kill at any moment leaves earlier outputs and never a torn file.
* **One run per directory.** :class:`DirectoryLock` holds an exclusive lock on ``--out`` and on
  ``--checkpoint-dir`` for the whole run (``fsmtl study``: on its ``--out``) with ``flock`` of
  ``DIR/.fsmtl.lock``, which records the owner's pid: a second run stops before training, naming
  the first one's pid. The kernel drops the lock when its process dies, ``kill -9`` included, so
  the lock of a dead process is taken over, with a warning naming it.
* **Write failures.** An ``OSError`` while writing names the file (its ``filename``);
  :func:`keep_finished` then saves the finished runs where it can (``--out``, the checkpoint
  directory, or the system's temporary directory) and says where.
* **Free space.** :func:`space_warnings` compares the free space of ``--out`` and
  ``--checkpoint-dir`` with what the run will write there.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import tempfile
import warnings
from pathlib import Path

from ..engine.checkpoint import atomic_write_text

LOCK_NAME = ".fsmtl.lock"


class DirectoryLock:
    """An exclusive lock on ``directory`` for one ``fsmtl`` command (see the module docstring).

    Args:
        directory: the directory to own (it must exist).
        flag: how messages name it (``--out``, ``--checkpoint-dir``).
        command: how messages name the owner (``fsmtl run``).
    """

    def __init__(self, directory: Path, flag: str, command: str = "fsmtl run") -> None:
        self.directory = Path(directory)
        self.flag = flag
        self.command = command
        self.path = self.directory / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> DirectoryLock:
        from .preflight import PreflightError

        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise PreflightError(
                    f"{self.flag} {self.directory}: cannot create {self.path}: {exc.strerror}"
                ) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                owner = _read_owner(fd)
                os.close(fd)
                raise PreflightError(
                    f"{self.flag} {self.directory} is in use by {_describe(owner, self.command)}"
                ) from None
            # The file may have been removed by its previous owner between our open and our lock:
            # then we hold a lock on a name nobody else sees; start again on the current file.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        stale = _read_owner(fd)
        if stale:
            warnings.warn(
                f"{self.flag} {self.directory}: taking over the lock of {_describe(stale, self.command)}, which is "
                "no longer running (it was killed or crashed)",
                UserWarning,
                stacklevel=2,
            )
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(owner).encode(), 0)
        os.fsync(fd)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()  # while still holding the lock: a waiting process then retries on a new file
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> DirectoryLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class Locks:
    """The directory locks of one command, released together (a directory named twice is locked once)."""

    def __init__(self) -> None:
        self.held: dict[Path, DirectoryLock] = {}

    def lock(self, directory: Path, flag: str, command: str = "fsmtl run") -> None:
        key = Path(directory).resolve()
        if key not in self.held:
            self.held[key] = DirectoryLock(directory, flag, command).acquire()

    def release(self) -> None:
        for lock in reversed(list(self.held.values())):
            lock.release()
        self.held.clear()

    def __enter__(self) -> Locks:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _read_owner(fd: int) -> dict:
    try:
        data = os.pread(fd, 4096, 0)
        return json.loads(data) if data.strip() else {}
    except (OSError, ValueError):
        return {"pid": "unknown"}


def _describe(owner: dict, command: str) -> str:
    pid = owner.get("pid", "unknown")
    host = owner.get("host")
    where = f" on {host}" if host and host != socket.gethostname() else ""
    return f"{owner.get('command', command)} (pid {pid}{where})"


def remove_stale_temporaries(directory: Path) -> None:
    """Temporary files of writes that a killed process left in ``directory`` (``.<name>.*.tmp``)."""
    if directory.is_dir():
        for path in directory.glob(".*.tmp"):
            path.unlink(missing_ok=True)


def write_outputs(results: dict, out: Path) -> list[Path]:
    """``table.txt``, ``results.csv``, the figures, then ``results.json`` (last: its presence
    means every output is complete), each atomically. Returns the figures' paths."""
    from .report import format_table, plot_figures, write_csv, write_json

    remove_stale_temporaries(out)
    atomic_write_text(format_table(results) + "\n", out / "table.txt")
    write_csv(results, out / "results.csv")
    figures = plot_figures(results, out)
    write_json(results, out / "results.json")
    return figures


def keep_finished(payload: dict, places: list[Path]) -> Path | None:
    """Write ``payload`` as JSON to the first of ``places`` that takes it (then the system's
    temporary directory); the path written, or None when nothing could be written anywhere."""
    text = json.dumps(payload, indent=1, default=str)
    fallback = Path(tempfile.gettempdir()) / f"fsmtl-partial-results-{os.getpid()}.json"
    for path in [*places, fallback]:
        try:
            return atomic_write_text(text, path)
        except OSError:
            continue
    return None


def _megabytes(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def expected_bytes(parameters: int, runs: int, figures: int, keep_last: int) -> dict[str, int]:
    """What one ``fsmtl run`` writes, generously: ``"checkpoints"``, the peak of one run's
    checkpoints (``keep_last`` plus the one being written, each the model, Adam's two moments and
    the masks) plus every finished run's result; ``"outputs"``, the figures and result files."""
    checkpoint = 4 * parameters * 3 + parameters + 200_000  # float32 model + two moments, masks, history
    return {
        "checkpoints": (keep_last + 1) * checkpoint + runs * 50_000,
        "outputs": figures * 250_000 + runs * 20_000 + 100_000,
    }


def space_warnings(needs: dict[Path, tuple[str, int]]) -> list[str]:
    """One message per directory whose free space is below what the run writes there
    (``{directory: (flag, bytes)}``; directories on one file system are summed)."""
    by_device: dict[int, list[tuple[Path, str, int]]] = {}
    for directory, (flag, n) in needs.items():
        try:
            by_device.setdefault(os.stat(directory).st_dev, []).append((directory, flag, n))
        except OSError:
            continue
    messages = []
    for entries in by_device.values():
        total = sum(n for _, _, n in entries)
        directory, flag, _ = entries[0]
        free = shutil.disk_usage(directory).free
        if free < total:
            names = " and ".join(f"{f} {d}" for d, f, _ in entries)
            messages.append(
                f"{names}: {_megabytes(free)} free, but this run writes up to about {_megabytes(total)} there; "
                "a full disk stops it (the finished runs are kept)"
            )
    return messages
