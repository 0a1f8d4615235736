"""Launching ``fsmtl run`` on several processes: ``--nproc N`` (torch's elastic launcher, what
``torchrun --standalone --nproc_per_node N`` runs), joining a ``torchrun`` process group from the
environment, and :func:`spawn` for tests, benchmarks and notebooks.

Ending the whole job when one rank fails (:class:`JobWatch`, started by :func:`run_cli` inside
torchrun): a rank that raises records ``rank r failed: <error>`` in the process group's store; every
rank runs a watchdog thread that polls that record and, once it appears, prints it as its one
``fsmtl: error:`` line and ends its process, whatever its main thread is doing (waiting in a
collective, or hung). A rank whose collective fails because of another rank (the peer closed its
connection, or the collective timed out) takes the record of the rank that failed, or, when there
is none (a rank killed, or hung), finds it: the rank whose heartbeat stopped (killed) or whose
count of collectives stays behind (hung). Collectives time out after the process group's
``timeout`` (``FSMTL_DIST_TIMEOUT`` seconds, 30 by default), so the whole job ends about that long
after a rank hangs, and within seconds after a rank raises, is killed or sees a non-finite loss
(which stops every rank at the same step: :mod:`fsmtl.engine.distributed`).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.distributed as dist

from .. import collectives
from ..collectives import is_main_process, rank_prefix
from ..engine import distributed

DEFAULT_TIMEOUT_S = 30.0


def env_world_size() -> int:
    """``WORLD_SIZE`` set by ``torchrun`` (1 when not launched by it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def collective_timeout_s() -> float:
    """The collectives' timeout: ``FSMTL_DIST_TIMEOUT`` seconds, :data:`DEFAULT_TIMEOUT_S` by default."""
    return float(os.environ.get("FSMTL_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))


def init_from_env(device: str = "cpu", *, timeout_s: float | None = None) -> str:
    """Initialize the default process group from torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``
    (``MASTER_ADDR``/``MASTER_PORT``); gloo for CPU devices, NCCL for CUDA. Returns the backend."""
    if timeout_s is None:
        timeout_s = collective_timeout_s()
    backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return dist.get_backend()


class JobWatch:
    """The watchdog of one rank of a torchrun job (see the module docstring).

    Args:
        poll_s: how often the thread publishes this rank's heartbeat and looks for a failure.
    """

    FAILURE = "fsmtl/failure"

    def __init__(self, poll_s: float = 0.5) -> None:
        self.rank, self.size = dist.get_rank(), dist.get_world_size()
        self.prefix = rank_prefix()
        self.poll_s = poll_s
        self.store = dist.TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            is_master=False,
            timeout=datetime.timedelta(seconds=10),
        )
        self.reporting = threading.Event()  # this rank's main thread reports: the thread stays quiet
        self.said = threading.Lock()
        self.spoken = False
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="fsmtl-job-watch", daemon=True)

    def start(self) -> JobWatch:
        self._beat()
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopped.set()

    def _beat(self) -> None:
        self.store.set(f"fsmtl/alive/{self.rank}", f"{time.monotonic():.3f} {collectives.collectives_entered()}")

    def _watch(self) -> None:
        while not self.stopped.wait(self.poll_s):
            try:
                self._beat()
                if not self.store.check([self.FAILURE]):
                    continue
                line = self.store.get(self.FAILURE).decode()
            except Exception:  # noqa: BLE001 (the store's host ended: the main thread's collectives say why)
                return
            if self.stopped.is_set() or self.reporting.is_set():
                return
            self.say(line)
            os._exit(1)  # the main thread may be hung or waiting in a collective: end the process now

    def say(self, line: str) -> None:
        """Print this rank's one error line (the first caller wins)."""
        with self.said:
            if not self.spoken:
                self.spoken = True
                print(f"{self.prefix}fsmtl: error: {line}; stopping every rank", file=sys.stderr, flush=True)

    def report(self, line: str) -> str:
        """Record ``line`` as the job's failure unless another rank recorded one first; returns the
        recorded one."""
        self.reporting.set()
        try:
            recorded = self.store.compare_set(self.FAILURE, "", line)
            return recorded.decode() if isinstance(recorded, bytes) else str(recorded)
        except Exception:  # noqa: BLE001 (no store: this rank's own line is all there is)
            return line

    def recorded(self, wait_s: float) -> str | None:
        """The failure another rank recorded, waiting up to ``wait_s``; None when none."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                if self.store.check([self.FAILURE]):
                    return self.store.get(self.FAILURE).decode()
            except Exception:  # noqa: BLE001
                return None
            if time.monotonic() > deadline:
                return None
            time.sleep(0.1)

    def culprit(self, exc: BaseException) -> str:
        """Why this rank's collective failed: the rank whose heartbeat stopped (killed) or whose
        count of collectives is behind this rank's (hung), from two reads of every heartbeat."""
        try:
            first = self._heartbeats()
            time.sleep(3 * self.poll_s + 0.5)
            second = self._heartbeats()
        except Exception:  # noqa: BLE001
            return f"rank {self.rank} lost the process group ({_first_line(exc)}): another rank ended"
        mine = collectives.collectives_entered()
        dead = [r for r in range(self.size) if r != self.rank and first.get(r) == second.get(r)]
        if dead:
            return f"rank {dead[0]} stopped responding (killed, or its process died without a message)"
        behind = [r for r, (_, count) in second.items() if r != self.rank and count < mine]
        if behind:
            r = behind[0]
            return (
                f"rank {r} is hung: it stayed at its collective {second[r][1]} while rank {self.rank} waited "
                f"{collective_timeout_s():.0f} s (the process group timeout) in collective {mine}"
            )
        return f"rank {self.rank}'s collective failed ({_first_line(exc)})"

    def _heartbeats(self) -> dict[int, tuple[str, int]]:
        out = {}
        for r in range(self.size):
            key = f"fsmtl/alive/{r}"
            if self.store.check([key]):
                stamp, count = self.store.get(key).decode().split()
                out[r] = (stamp, int(count))
        return out

    def failure_line(self, exc: BaseException) -> str:
        """The job's one failure line for ``exc`` raised on this rank (recorded for every rank)."""
        if _is_collective_error(exc):
            line = self.recorded(wait_s=1.0) or self.culprit(exc)
        elif isinstance(exc, FloatingPointError) and distributed.nonfinite_ranks:
            ranks = ", ".join(map(str, distributed.nonfinite_ranks))
            line = f"rank {ranks} failed: {type(exc).__name__}: {_first_line(exc)} (its own loss)"
        else:
            line = f"rank {self.rank} failed: {type(exc).__name__}: {_first_line(exc)}"
        return self.report(line)


def _signal_name(number: int) -> str:
    try:
        return f"killed by {signal.Signals(number).name}"
    except ValueError:
        return f"killed by signal {number}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _is_collective_error(exc: BaseException) -> bool:
    """A failed collective (a peer closed its connection, a timeout): a consequence of another rank."""
    if isinstance(exc, dist.DistError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        marker in text for marker in ("gloo", "Connection closed by peer", "Timed out", "NCCL", "Connection reset")
    )


def destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, fn: Callable, size: int, port: int, timeout_s: float, args: tuple) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=size, timeout=datetime.timedelta(seconds=timeout_s))
    try:
        fn(rank, size, *args)
    finally:
        dist.destroy_process_group()


def spawn(fn: Callable, nprocs: int, args: tuple = (), *, timeout_s: float = 60.0, pg_timeout_s: float = 30.0) -> None:
    """Run ``fn(rank, world_size, *args)`` in ``nprocs`` fresh processes joined in a gloo group on
    127.0.0.1 (a free port); raise if any fails or the whole run exceeds ``timeout_s`` (then the
    processes are killed). For tests, benchmarks and notebooks; ``torchrun`` for real jobs."""
    import torch.multiprocessing as mp

    context = mp.start_processes(
        _worker, args=(fn, nprocs, free_port(), pg_timeout_s, args), nprocs=nprocs, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + timeout_s
    try:
        while not context.join(timeout=max(0.1, min(1.0, deadline - time.monotonic()))):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the {nprocs} processes did not finish within {timeout_s:.0f} s")
    finally:
        for p in context.processes:
            if p.is_alive():
                p.kill()
                p.join(5)


def _without_nproc(argv: Sequence[str]) -> list[str]:
    out, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = i + 1 < len(argv)
            continue
        if a.startswith("--nproc="):
            continue
        out.append(a)
    return out


def launch(nproc: int, argv: Sequence[str]) -> int:
    """``fsmtl run --nproc N``: the same command on N local processes through torch's elastic
    launcher (``torch.distributed.run``, what ``torchrun --standalone --nproc_per_node N`` runs);
    each process's output lines carry its rank. Returns the exit code (non-zero if any rank failed)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    args = ["--standalone", f"--nproc_per_node={nproc}", "--tee=3", "-m", "fsmtl", *_without_nproc(argv)]
    elastic = logging.getLogger("torch.distributed.elastic")
    level = elastic.level
    elastic.setLevel(logging.CRITICAL)  # the ranks' own lines say what failed; not the agent's log as well
    try:
        torchrun(args)
    except ChildFailedError as exc:
        codes = {rank: f.exitcode for rank, f in sorted(exc.failures.items())}
        failures = "; ".join(
            f"rank {rank}: exit code {code}" + (f" ({_signal_name(-code)})" if code < 0 else "")
            for rank, code in codes.items()
        )
        print(f"fsmtl: error: {nproc} processes: {failures}", file=sys.stderr)
        return 2 if all(code == 2 for code in codes.values()) else 1
    except SignalException as exc:  # SIGINT/SIGTERM: the launcher passed it on; the ranks stopped cleanly
        print(f"fsmtl: {nproc} processes stopped by signal {exc.sigval.name}", file=sys.stderr)
        return 130
    finally:
        elastic.setLevel(level)
    return 0


def run_cli(args, run_command: Callable) -> int:
    """``fsmtl run``: launch ``--nproc`` processes, or, inside torchrun (``WORLD_SIZE`` > 1), join the
    process group and run ``run_command(args)`` with rank 0 alone writing ``--out`` and showing
    progress (the other ranks write into a temporary folder that is then removed)."""
    nproc = getattr(args, "nproc", 1) or 1
    if nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {nproc}")
    if env_world_size() <= 1:
        if nproc > 1:
            return launch(nproc, args.argv)
        return run_command(args)
    if nproc > 1:
        raise ValueError("--nproc starts its own processes: do not combine it with torchrun")
    backend = init_from_env(args.device)
    scratch = None
    watch = JobWatch().start()
    try:
        print(f"{rank_prefix()}joined the process group ({backend}, {env_world_size()} processes)", file=sys.stderr)
        if is_main_process():
            code = run_command(args)
        else:
            # Other ranks: the same work, printing nothing but errors, writing into a scratch folder.
            scratch = tempfile.mkdtemp(prefix=f"fsmtl-rank{dist.get_rank()}-")
            args.out, args.no_progress, args.overwrite = Path(scratch) / "out", True, False
            with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # rank 0 shows the same warnings
                code = run_command(args)
        if code not in (0, 130):  # this rank printed why (a file it could not write): stop the others now
            watch.report(f"rank {dist.get_rank()} ended with exit code {code} (its own error line says why)")
        return code
    except Exception as exc:
        # The launcher stops the other ranks with SIGTERM as soon as one ends: finish this line first.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        watch.say(watch.failure_line(exc))  # every rank prints the one line of the rank that failed
        misuse = isinstance(exc, (ValueError, TypeError, KeyError)) and not _is_collective_error(exc)
        return 2 if misuse else 1  # as a single process: a misuse 2, a failure 1
    finally:
        watch.stop()
        destroy()
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
