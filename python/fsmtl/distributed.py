"""Multi-process FSMTL on ``torch.distributed`` (gloo on CPU, NCCL on CUDA), without DDP's reducer.

What the :class:`~fsmtl.trainer.Trainer` does when a process group with more than one rank is
initialized (``torchrun``, ``fsmtl run --nproc N`` or a user's own script):

* **Data**: every rank draws the same global batch order (the same seed) with the global batch
  ``batch_size * world_size`` and keeps its share ``batch[rank::world_size]`` (the interleaving of
  ``DistributedSampler``); a loader with a ``DistributedSampler`` already yields the rank's share.
* **Step**: each rank forms its per-task gradients and the masked average locally (no DDP wrapper,
  so no ``retain_graph`` inside DDP's reducer); then :class:`GradientSync` sums the combined shared
  and head gradients, weighted by each rank's share of the batch, with **one** ``all_reduce`` over
  one flat buffer: as many numbers as plain data-parallel training moves, not T times that. The T
  loss values (and a stop flag) travel in a second all-reduce of ``T + 1`` numbers before the
  backward, so every rank agrees on non-finite losses and on stop requests.
* **Mask update**: the N Fisher samples are split across ranks (:func:`shard_sampler`), each rank
  scores its share and :func:`reduce_scores` sums the weighted Fisher buffers with one
  ``all_reduce``; every rank then takes the same deterministic top-K, and :func:`check_identical`
  compares a checksum of the masks across ranks (one all-reduce of two int64) and raises if they differ.
* **Faults**: collectives time out after the process group's ``timeout``
  (:func:`init_from_env`, ``FSMTL_DIST_TIMEOUT`` seconds, 60 by default), so a rank that died or
  raised makes the others fail with an error instead of hanging.
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

DEFAULT_TIMEOUT_S = 60.0


def world(group=None) -> tuple[int, int] | None:
    """``(rank, world_size)`` when a process group with more than one rank is initialized, else None."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    size = dist.get_world_size(group)
    return (dist.get_rank(group), size) if size > 1 else None


def world_size() -> int:
    """Ranks in the default process group (1 when none is initialized)."""
    w = world()
    return 1 if w is None else w[1]


def is_main_process() -> bool:
    """True on rank 0 and in a single process: the one that writes files and shows progress."""
    w = world()
    return w is None or w[0] == 0


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if world() is not None:
        dist.barrier()


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


def rank_prefix() -> str:
    """``"[rank r/W] "`` for log lines in a multi-process run, ``""`` otherwise."""
    w = world()
    return f"[rank {w[0]}/{w[1]}] " if w is not None else ""


# ------------------------------------------------------------------------------------ data


def shares(n: int, rank: int, size: int) -> torch.Tensor:
    """Indices ``rank, rank + size, ...`` of a batch of ``n`` (``DistributedSampler``'s interleaving)."""
    return torch.arange(rank, n, size)


def _uses_distributed_sampler(data) -> bool:
    from torch.utils.data import DistributedSampler

    items = data if isinstance(data, (list, tuple)) else [data]
    for d in items:
        sampler = getattr(getattr(d, "batch_sampler", None), "sampler", None) or getattr(d, "sampler", None)
        if isinstance(sampler, DistributedSampler):
            return True
    return False


class GradientSync:
    """The per-step collectives of one Trainer in a process group of ``size`` ranks.

    The Trainer draws global batches (:meth:`global_batch_size`), :meth:`shard_source` keeps this
    rank's share of each one and its weight ``n_rank / n_global``; :meth:`reduce_losses` and
    :meth:`all_reduce_grads` turn the local losses and gradients into the global batch's ones.
    """

    def __init__(self, group=None) -> None:
        w = world(group)
        if w is None:
            raise RuntimeError("GradientSync needs an initialized process group with more than one rank")
        self.group = group
        self.rank, self.size = w
        self.weight = 1.0 / self.size
        self.stop = False
        self.bytes_per_step = 0
        self.presharded = False

    def global_batch_size(self, batch_size: int | None, data) -> int | None:
        self.presharded = _uses_distributed_sampler(data)
        if batch_size is None or self.presharded:
            return batch_size
        return batch_size * self.size

    def shard_source(self, source):
        """Wrap a batch source so that its ``epoch()`` yields this rank's share of each batch."""
        if self.presharded:
            return source
        return _ShardedSource(source, self)

    def shard(self, inputs: list[torch.Tensor], targets: list[torch.Tensor]):
        """This rank's share of a global batch; records its weight. A rank whose share would be
        empty (a last batch smaller than the world) computes on one example with weight 0."""
        sizes = [int(x.shape[0]) for x in inputs]
        idx = [shares(n, self.rank, self.size) for n in sizes]
        counts = [len(i) for i in idx]
        self.weight = sum(c / n for c, n in zip(counts, sizes)) / len(sizes)
        idx = [i if len(i) else torch.zeros(1, dtype=torch.long) for i in idx]
        same = len(inputs) > 1 and all(x is inputs[0] for x in inputs)
        if same:
            x = inputs[0][idx[0]]
            new_inputs = [x] * len(inputs)
        else:
            new_inputs = [x[i] for x, i in zip(inputs, idx)]
        return new_inputs, [y[i] for y, i in zip(targets, idx)]

    def reduce_losses(self, values: torch.Tensor, stop: bool) -> torch.Tensor:
        """The global batch's mean loss per task (float64 ``[T]``); also agrees on ``stop``."""
        buf = torch.cat([values.double() * self.weight, torch.tensor([1.0 if stop else 0.0], dtype=torch.float64)])
        dist.all_reduce(buf, group=self.group)
        self.stop = bool(buf[-1] > 0)
        return buf[:-1].to(values.dtype)

    def all_reduce_grads(self, params: Sequence[torch.Tensor]) -> None:
        """``.grad = sum_r w_r * grad_r`` with one all-reduce of one flat buffer (a parameter
        without ``.grad`` contributes zeros and keeps ``None``)."""
        params = [p for p in params if p.requires_grad]
        if not params:
            return
        ref = params[0]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1).to(ref.dtype) for g in grads]).mul_(self.weight)
        dist.all_reduce(flat, group=self.group)
        self.bytes_per_step = flat.numel() * flat.element_size()
        offset = 0
        with torch.no_grad():
            for p, g in zip(params, grads):
                n = g.numel()
                if p.grad is not None:
                    p.grad.copy_(flat[offset : offset + n].view_as(g))
                offset += n

    def info(self) -> dict:
        """``world_size``, ``backend`` and the gradient bytes each rank all-reduces per step."""
        return {"world_size": self.size, "backend": dist.get_backend(self.group), "bytes_per_step": self.bytes_per_step}

    def shard_sampler(self, sample: Callable):
        return shard_sampler(sample, self.rank, self.size)


class _ShardedSource:
    def __init__(self, source, sync: GradientSync) -> None:
        self.source = source
        self.sync = sync
        self.steps_per_epoch = source.steps_per_epoch

    def epoch(self):
        for inputs, targets in self.source.epoch():
            yield self.sync.shard(list(inputs), list(targets))


def shard_sampler(sample: Callable, rank: int, size: int) -> Callable:
    """``sample(t, n)`` drawing the same ``n`` examples on every rank (the same generator state)
    and keeping this rank's disjoint share of them."""

    def sharded(t: int, n: int):
        x, y = sample(t, n)
        if x.shape[0] < size:
            raise ValueError(f"{x.shape[0]} Fisher samples cannot be split over {size} ranks; use samples >= {size}")
        idx = shares(x.shape[0], rank, size).to(x.device)
        return x[idx], y[idx]

    return sharded


# ---------------------------------------------------------------------------------- masks


def reduce_scores(per_task: list[list[torch.Tensor]], counts: Sequence[int], group=None) -> list[list[torch.Tensor]]:
    """Scores of the union of the ranks' samples: ``sum_r n_r * s_r / sum_r n_r`` per task, with
    one all-reduce over one flat float32 buffer (scores of all tasks, then the counts)."""
    if world(group) is None:
        return per_task
    shapes = [[s.shape for s in task] for task in per_task]
    device = per_task[0][0].device
    weights = torch.tensor(counts, dtype=torch.float32, device=device)
    flat = torch.cat([torch.cat([s.reshape(-1).float() for s in task]) * w for task, w in zip(per_task, weights)])
    flat = torch.cat([flat, weights])
    dist.all_reduce(flat, group=group)
    totals = flat[-len(per_task) :]
    out, offset = [], 0
    for t, task_shapes in enumerate(shapes):
        scores = []
        for shape in task_shapes:
            n = shape.numel()
            scores.append((flat[offset : offset + n] / totals[t]).view(shape))
            offset += n
        out.append(scores)
    return out


def mask_checksum(words: torch.Tensor) -> int:
    """A position-weighted int64 checksum of packed mask words (wraps around; deterministic)."""
    w = words.reshape(-1).to(torch.int64) & 0xFFFFFFFF
    pos = torch.arange(1, w.numel() + 1, dtype=torch.int64, device=w.device)
    return int(((w * (pos * 2654435761 % 2147483647 + 1)) & 0x7FFFFFFFFFFF).sum())


def check_identical(mask, group=None) -> None:
    """Raise ``RuntimeError`` when ``mask`` (a ``PackedMask``) differs between ranks, by one
    all-reduce (MAX) of ``[checksum, -checksum]``."""
    w = world(group)
    if w is None:
        return
    c = mask_checksum(mask.words)
    buf = torch.tensor([c, -c], dtype=torch.int64, device=mask.words.device)
    dist.all_reduce(buf, op=dist.ReduceOp.MAX, group=group)
    if int(buf[0]) != -int(buf[1]):
        raise RuntimeError(
            f"{rank_prefix()}the task masks differ between ranks (checksum {c} here, max {int(buf[0])}, "
            f"min {-int(buf[1])}): Fisher buffers or top-K were not identical"
        )


# ------------------------------------------------------------------------------- launching


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


# ------------------------------------------------------------------------------ the command


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


def run_record() -> dict:
    """``{"distributed": {"world_size": W, "backend": ...}}`` for results.json in a multi-process
    run; ``{}`` in a single process (whose results stay as they were)."""
    w = world()
    return {} if w is None else {"distributed": {"world_size": w[1], "backend": dist.get_backend()}}
