"""Launching ``fsmtl run`` on several processes: ``--nproc N`` (torch's elastic launcher, what
``torchrun --standalone --nproc_per_node N`` runs), joining a ``torchrun`` process group from the
environment, and :func:`spawn` for tests, benchmarks and notebooks.

Collectives time out after the process group's ``timeout`` (:func:`init_from_env`,
``FSMTL_DIST_TIMEOUT`` seconds, 60 by default), so a rank that died or raised makes the others fail
with an error instead of hanging.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import shutil
import socket
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.distributed as dist

from ..collectives import is_main_process, rank_prefix

DEFAULT_TIMEOUT_S = 60.0


def env_world_size() -> int:
    """``WORLD_SIZE`` set by ``torchrun`` (1 when not launched by it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_from_env(device: str = "cpu", *, timeout_s: float | None = None) -> str:
    """Initialize the default process group from torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``
    (``MASTER_ADDR``/``MASTER_PORT``); gloo for CPU devices, NCCL for CUDA. Returns the backend."""
    if timeout_s is None:
        timeout_s = float(os.environ.get("FSMTL_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return dist.get_backend()


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
    try:
        torchrun(args)
    except ChildFailedError as exc:
        failures = "; ".join(f"rank {f.global_rank}: exit code {f.exitcode}" for f in exc.failures.values())
        print(f"fsmtl: error: {nproc} processes: {failures}", file=sys.stderr)
        return 1
    except SignalException as exc:  # SIGINT/SIGTERM: the launcher passed it on; the ranks stopped cleanly
        print(f"fsmtl: {nproc} processes stopped by signal {exc.sigval.name}", file=sys.stderr)
        return 130
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
    try:
        print(f"{rank_prefix()}joined the process group ({backend}, {env_world_size()} processes)", file=sys.stderr)
        if is_main_process():
            return run_command(args)
        # Other ranks: the same work, printing nothing but errors, writing into a scratch folder.
        scratch = tempfile.mkdtemp(prefix=f"fsmtl-rank{dist.get_rank()}-")
        args.out, args.no_progress, args.overwrite = Path(scratch) / "out", True, False
        with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # rank 0 shows the same warnings
            return run_command(args)
    except Exception as exc:
        print(f"{rank_prefix()}fsmtl: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        raise
    finally:
        destroy()
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
