"""Fault injection into real ``fsmtl`` processes, for the fault suite (tests/test_faults_*.py).

Python imports ``sitecustomize`` at start-up from ``sys.path``: a test puts this folder on
``PYTHONPATH`` and names one fault in ``FSMTL_FAULT``; the process (and every rank torchrun starts
from it) then runs the unchanged command with the fault:

* ``kill-writing:NAME``: SIGKILL (kill -9) while writing the first file whose name starts with
  ``NAME``: its temporary file holds the data, fsync has not returned, nothing is renamed yet;
* ``enospc-writing:NAME``: that write fails with ENOSPC (a full file system);
* ``slow:SECONDS``: every training step sleeps (a run that holds its locks for a while);
* ``rank:R:CALL:KIND``: on rank ``R``, at the ``CALL``-th step's loss all-reduce, ``hang`` (sleep),
  ``raise`` (RuntimeError), ``kill`` (SIGKILL) or ``nan`` (this rank's first loss becomes NaN).

``FSMTL_FAULT_MARK``, when set, names a file created when the fault fires (the test waits for it).
"""

import os

_FAULT = os.environ.get("FSMTL_FAULT", "")


def _mark() -> None:
    mark = os.environ.get("FSMTL_FAULT_MARK")
    if mark:
        open(mark, "w").close()


def _writing(fd: int, name: str) -> bool:
    try:
        return os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(f".{name}")
    except OSError:
        return False


def _install() -> None:
    import signal
    import time

    kind, _, arg = _FAULT.partition(":")
    if kind in ("kill-writing", "enospc-writing"):
        import errno

        real_fsync = os.fsync

        def fsync(fd):
            if _writing(fd, arg):
                _mark()
                if kind == "kill-writing":
                    os.kill(os.getpid(), signal.SIGKILL)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_fsync(fd)

        os.fsync = fsync
    elif kind == "slow":
        from fsmtl.engine.trainer import Trainer

        real_step = Trainer._train_step

        def slow_step(self, *args, **kwargs):
            _mark()
            time.sleep(float(arg))
            return real_step(self, *args, **kwargs)

        Trainer._train_step = slow_step
    elif kind == "rank":
        from fsmtl.engine.distributed import GradientSync

        rank, call, what = arg.split(":")
        real_reduce = GradientSync.reduce_losses
        calls = [0]

        def reduce_losses(self, values, stop):
            if self.rank == int(rank):
                calls[0] += 1
                if calls[0] == int(call):
                    _mark()
                    if what == "hang":
                        time.sleep(600)
                    elif what == "kill":
                        os.kill(os.getpid(), signal.SIGKILL)
                    elif what == "raise":
                        raise RuntimeError(f"injected failure on rank {rank}")
                    elif what == "nan":
                        values = values.clone()
                        values[0] = float("nan")
            return real_reduce(self, values, stop)

        GradientSync.reduce_losses = reduce_losses


if _FAULT:
    _install()
