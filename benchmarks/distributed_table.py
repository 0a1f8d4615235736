"""Steps per second and bytes communicated per step: FSMTL on torch.distributed vs plain DDP.

Peers side by side in one run, 1 and 2 processes (gloo on CPU, 1 thread each, 127.0.0.1):

* ``FS (fsmtl)``: the :class:`fsmtl.Trainer` with :class:`FisherSparse` (keep 0.3, masks computed
  once at the first step, then fixed), per-task gradients, masked average locally, then one
  all-reduce of the combined shared + head gradients (:mod:`fsmtl.engine.distributed`);
* ``MTL (fsmtl)``: the same Trainer with dense MTL (:class:`EqualWeighting`);
* ``MTL (DDP)``: plain ``DistributedDataParallel`` of the same dense model, loss ``sum_t L_t``
  (trunk gradient rescaled by 1/T, as dense MTL), ``optimizer.step()``.

Model: an MLP trunk 64-256-256 with T = 8 binary heads (the ``digits-attributes`` shape, wider),
per-process batch 64, SGD. Each configuration trains ``--steps`` steps after ``--warmup`` untimed
ones; the table gives the median of ``--repeats`` timings in steps/s, samples/s (all processes)
and the bytes each process all-reduces per step (payload of the collectives, not wire bytes:
ring all-reduce sends about 2 (W-1)/W times the payload). Run:
``OMP_NUM_THREADS=1 python benchmarks/distributed_table.py`` (writes ``results/distributed.json``).

``--fsdp``: instead, per-rank memory and bytes per step of sharded training on the ResNet-18 trunk
(11.2M parameters, 32x32 inputs, T = 8 binary heads, Adam) at W = 2 and 3 ranks, side by side:
DDP (plain, ``DistributedDataParallel``), plain FSDP2 (``fully_shard`` per block, dense MTL),
FSMTL on DDP (the Trainer's one all-reduce per step) and FSMTL on FSDP2 (``parallel="fsdp"``).
Memory is counted from the tensors each rank holds after a step (parameters, gradients, optimizer
state: their local shards; masks: the packed masks), bytes per step from the payloads of the
collectives each rank calls (DDP's from its buckets: 4 P). Writes ``results/fsdp.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import fsmtl
from fsmtl.collectives import world
from fsmtl.data import Split
from fsmtl.run.launcher import spawn
from fsmtl.strategies import EqualWeighting, FisherSparse, MaskSchedule
from fsmtl.tasks import Task

T, D, H, BATCH = 8, 64, 256, 64
TASKS = [Task(f"attr{t}", "binary", 1) for t in range(T)]


def _model() -> fsmtl.MultiTaskModel:
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(D, H), nn.ReLU(), nn.Linear(H, H), nn.ReLU())
    return fsmtl.MultiTaskModel(trunk, [nn.Linear(H, 1) for _ in range(T)])


def _split(n: int) -> Split:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, D, generator=g)
    w = torch.randn(D, T, generator=g)
    y = (x @ w > 0).float()
    return Split([x] * T, [y[:, t].contiguous() for t in range(T)])


def _trainer_rate(method: str, steps: int, warmup: int, size: int) -> tuple[float, int]:
    model = _model()
    strategy = (
        FisherSparse(0.3, schedule=MaskSchedule(warmup=0, every=10**9, unit="step"), samples=64)
        if method == "fs"
        else EqualWeighting()
    )
    trainer = fsmtl.Trainer(model, TASKS, strategy, torch.optim.SGD(model.parameters(), lr=0.01), seed=0)
    data = _split(BATCH * size * (warmup + steps))
    trainer.fit(Split([x[: BATCH * size * warmup] for x in data.inputs],
                      [y[: BATCH * size * warmup] for y in data.targets]), epochs=1, batch_size=BATCH)  # fmt: skip
    _barrier()
    start = time.perf_counter()
    history = trainer.fit(data, epochs=1, batch_size=BATCH)
    _barrier()
    elapsed = time.perf_counter() - start
    total_steps = -(-data.sizes[0] // (BATCH * size))
    grads = history.get("distributed", {}).get("bytes_per_step", 0)
    losses = (T + 1) * 8 if size > 1 else 0  # the loss values and stop flag, float64
    return total_steps / elapsed, grads + losses


class _AllHeads(nn.Module):
    """``forward(x)`` -> every head's output from one trunk pass (what DDP wraps)."""

    def __init__(self, model: fsmtl.MultiTaskModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        features = self.model.features(x)
        return [head(features) for head in self.model.heads]


def _ddp_rate(steps: int, warmup: int, size: int) -> tuple[float, int]:
    model = _model()
    net = _AllHeads(model)
    net = nn.parallel.DistributedDataParallel(net) if size > 1 else net
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    data = _split(BATCH * (warmup + steps))
    x, ys = data.inputs[0], torch.stack(data.targets, 1)
    shared = model.shared_parameters()
    loss_fn = nn.BCEWithLogitsLoss()

    def step(i: int) -> None:
        xb, yb = x[i * BATCH : (i + 1) * BATCH], ys[i * BATCH : (i + 1) * BATCH]
        loss = sum(loss_fn(out.squeeze(1), yb[:, t]) for t, out in enumerate(net(xb)))
        opt.zero_grad(set_to_none=True)
        loss.backward()  # DDP: bucketed all-reduces of every gradient, overlapped with the backward
        with torch.no_grad():
            for p in shared:
                p.grad.div_(T)
        opt.step()

    for i in range(warmup):
        step(i)
    _barrier()
    start = time.perf_counter()
    for i in range(warmup, warmup + steps):
        step(i)
    _barrier()
    elapsed = time.perf_counter() - start
    comm = sum(p.numel() * p.element_size() for p in model.parameters()) if size > 1 else 0
    return steps / elapsed, comm


def _barrier() -> None:
    if world() is not None:
        dist.barrier()


def _measure(rank: int, size: int, out: str, steps: int, warmup: int, repeats: int) -> None:
    torch.set_num_threads(1)
    rows = {}
    for name, run in (
        ("FS (fsmtl)", lambda: _trainer_rate("fs", steps, warmup, size)),
        ("MTL (fsmtl)", lambda: _trainer_rate("mtl", steps, warmup, size)),
        ("MTL (DDP)", lambda: _ddp_rate(steps, warmup, size)),
    ):
        results = [run() for _ in range(repeats)]
        rows[name] = {"steps_per_s": statistics.median(r[0] for r in results), "bytes_per_step": results[0][1]}
    if rank == 0:
        Path(out).write_text(json.dumps(rows))


def _local_bytes(tensors) -> int:
    total = 0
    for t in tensors:
        if t is None:
            continue
        local = t.to_local() if hasattr(t, "to_local") else t
        total += local.numel() * local.element_size()
    return total


def _fsdp_resnet() -> fsmtl.MultiTaskModel:
    from fsmtl.models import ResNet18Trunk

    torch.manual_seed(0)
    trunk = ResNet18Trunk(3)
    return fsmtl.MultiTaskModel(trunk, [nn.Linear(trunk.out_features, 1) for _ in range(T)])


def _fsdp_row(kind: str, size: int, steps: int, batch: int) -> dict:
    """One configuration's per-rank memory and bytes per step (after ``steps`` steps)."""
    from fsmtl.strategies import EqualWeighting, FisherSparse

    payload = {"bytes": 0}
    originals = {}
    for name in ("reduce_scatter_single", "all_gather_single"):
        originals[name] = getattr(dist, name)

        def spy(*args, _original=originals[name], **kwargs):
            tensor = kwargs.get("input", args[1] if len(args) > 1 else None)
            payload["bytes"] += tensor.numel() * tensor.element_size()
            return _original(*args, **kwargs)

        setattr(dist, name, spy)
    try:
        g = torch.Generator().manual_seed(2)
        x = torch.randn(batch * size * steps, 3, 32, 32, generator=g)
        data = Split([x] * T, [(x[:, t % 3].mean((1, 2)) > 0).float() for t in range(T)])
        model = _fsdp_resnet()
        if kind == "DDP":
            ddp = torch.nn.parallel.DistributedDataParallel(model)
            optimizer = torch.optim.Adam(ddp.parameters(), 1e-3)
            for step in range(steps):
                i = slice((step * size + dist.get_rank()) * batch, (step * size + dist.get_rank() + 1) * batch)
                features = ddp.module.trunk(x[i])
                loss = sum(nn.functional.binary_cross_entropy_with_logits(h(features)[:, 0], y[i])
                           for h, y in zip(model.heads, data.targets))  # fmt: skip
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            step_bytes = 4 * sum(p.numel() for p in model.parameters())  # DDP all-reduces every gradient once
            masks = 0
        else:
            sharded = kind.endswith("FSDP2")
            if sharded:
                model.shard()
            strategy = FisherSparse(0.3, samples=16, schedule=MaskSchedule(0, 1), update="average") if (
                kind.startswith("FSMTL")
            ) else (
                EqualWeighting())  # fmt: skip
            optimizer = torch.optim.Adam(model.parameters(), 1e-3)
            trainer = fsmtl.Trainer(model, TASKS, strategy, optimizer, parallel="fsdp" if sharded else None)
            trainer.fit(data, epochs=1, batch_size=batch, progress=None)  # the mask update is at step 0
            payload["bytes"] = 0
            trainer.fit(data, epochs=1, batch_size=batch, progress=None)  # masks kept: steps only
            step_bytes = payload["bytes"] // steps if sharded else trainer.gradient_sync.bytes_per_step
            mask = strategy.mask if kind.startswith("FSMTL") else None
            masks = mask.words.numel() * 4 if mask is not None else 0
        states = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
        return {
            "parameters": _local_bytes(model.parameters()),
            "gradients": _local_bytes(p.grad for p in model.parameters()),
            "optimizer": _local_bytes(states),
            "masks": masks,
            "bytes_per_step": step_bytes,
        }
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)


def _fsdp_measure(rank: int, size: int, out: str, steps: int, batch: int) -> None:
    torch.set_num_threads(1)
    rows = {kind: _fsdp_row(kind, size, steps, batch) for kind in ("DDP", "FSDP2", "FSMTL on DDP", "FSMTL on FSDP2")}
    if rank == 0:
        Path(out).write_text(json.dumps(rows))


def fsdp_table(steps: int, batch: int, out: Path) -> None:
    table = {}
    with tempfile.TemporaryDirectory() as tmp:
        for size in (2, 3):
            spawn(_fsdp_measure, size, (f"{tmp}/{size}.json", steps, batch), timeout_s=1800)
            table[size] = json.loads(Path(f"{tmp}/{size}.json").read_text())
    params = sum(p.numel() for p in _fsdp_resnet().parameters())
    load = os.getloadavg()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average "
          f"{load[0]:.1f}; torch {torch.__version__}; ResNet-18 trunk + {T} heads, P = {params:,} float32; "
          f"per-rank batch {batch}, Adam")  # fmt: skip
    print("| method | W | parameters MiB | gradients MiB | optimizer MiB | masks MiB | bytes per step and rank |")
    print("|---|---|---:|---:|---:|---:|---:|")
    mib = 2**20
    for kind in table[2]:
        for size in (2, 3):
            r = table[size][kind]
            print(f"| {kind} | {size} | {r['parameters'] / mib:.1f} | {r['gradients'] / mib:.1f} | "
                  f"{r['optimizer'] / mib:.1f} | {r['masks'] / mib:.1f} | {r['bytes_per_step']:,} |")  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"params": params, "T": T, "batch": batch, "load": load, "table": table}, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fsdp", action="store_true", help="the sharded-training memory and bytes table instead")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "distributed.json")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.fsdp:
        out = args.out if args.out.name != "distributed.json" else args.out.with_name("fsdp.json")
        fsdp_table(steps=4, batch=4, out=out)
        return
    table = {}
    with tempfile.TemporaryDirectory() as tmp:
        for size in (1, 2):
            path = f"{tmp}/{size}.json"
            if size == 1:
                _measure(0, 1, path, args.steps, args.warmup, args.repeats)
            else:
                spawn(_measure, size, (path, args.steps, args.warmup, args.repeats), timeout_s=600)
            table[size] = json.loads(Path(path).read_text())
    params = sum(p.numel() for p in _model().parameters())
    load = os.getloadavg()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"load average {load[0]:.1f}; torch {torch.__version__}; {params} parameters (float32), T={T}, "
          f"per-process batch {BATCH}; median of {args.repeats} x {args.steps} steps")  # fmt: skip
    print("| method | processes | steps/s | samples/s | bytes all-reduced per step and process |")
    print("|---|---|---|---|---|")
    for name in table[1]:
        for size in (1, 2):
            r = table[size][name]
            print(f"| {name} | {size} | {r['steps_per_s']:.1f} | {r['steps_per_s'] * BATCH * size:.0f} | "
                  f"{r['bytes_per_step']:,} |")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"params": params, "T": T, "batch": BATCH, "load": load, "table": table}, indent=1))


if __name__ == "__main__":
    main()
