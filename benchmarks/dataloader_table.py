"""Per-step cost of the Trainer's data paths and of one checkpoint write.

Peers side by side in one run, on the built-in ``digits-attributes`` benchmark (8 binary tasks,
MLP 64-128-128, batch 64, 1078 training samples = 17 steps per epoch), dense MTL and FS:

* ``Split``: the Trainer on the in-memory split;
* ``Dataset``: the Trainer on ``bench.datasets("train")`` (it builds the DataLoader);
* ``DataLoader``: a user's ``DataLoader(TensorDataset(x, *ys), batch_size=64, shuffle=True)``.

Median ms per step over ``--repeats`` runs of ``--epochs`` epochs each, and the ratio to the
``Split`` path. Then the median time of ``Trainer.save_checkpoint`` (atomic: tmp file, fsync,
rename) and the file size. Run: ``OMP_WAIT_POLICY=PASSIVE OMP_NUM_THREADS=1 taskset -c 0
python benchmarks/dataloader_table.py``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
from torch.utils.data import DataLoader, TensorDataset

import fsmtl
from fsmtl.data import load_benchmark
from fsmtl.models import build_model
from fsmtl.strategies import EqualWeighting, FisherSparse, MaskSchedule


def make(bench, method, trainer_cls):
    torch.manual_seed(0)
    model = build_model(bench)
    if method == "mtl":
        strategy = EqualWeighting()
    else:
        strategy = FisherSparse(0.5, samples=256, schedule=MaskSchedule(warmup=0, every=1000))
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    return trainer_cls(model, bench.tasks, strategy, opt, homogeneous=bench.homogeneous)


def step_ms(bench, method, trainer_cls, data, epochs, batch_size=64):
    trainer = make(bench, method, trainer_cls)
    trainer.fit(bench.train, epochs=1, batch_size=batch_size)  # warm-up, incl. the mask of FS
    steps = -(-bench.train.sizes[0] // batch_size) * epochs
    start = time.perf_counter()
    trainer.fit(data, epochs=epochs, batch_size=batch_size)
    return (time.perf_counter() - start) / steps * 1e3


def per_step_ms(bench, method, peers, epochs, repeats):
    """Median ms per step of each peer; the peers take turns within each repeat, so a change of
    load on the shared machine hits them alike."""
    times = {name: [] for name in peers}
    for _ in range(repeats):
        for name, (cls, data) in peers.items():
            times[name].append(step_ms(bench, method, cls, data, epochs))
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    bench = load_benchmark("digits-attributes")
    x, ys = bench.train.inputs[0], bench.train.targets
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, load average {os.getloadavg()[0]:.2f}, "
        f"{os.cpu_count()} cores"
    )
    print("| method | Split | Dataset | DataLoader | Dataset / Split | DataLoader / Split |")
    print("|---|---:|---:|---:|---:|---:|")
    for method in ("mtl", "fs"):
        peers = {
            "Split": (fsmtl.Trainer, bench.train),
            "Dataset": (fsmtl.Trainer, bench.datasets("train")),
            "DataLoader": (fsmtl.Trainer, DataLoader(TensorDataset(x, *ys), batch_size=64, shuffle=True)),
        }
        ms = per_step_ms(bench, method, peers, args.epochs, args.repeats)
        split, dataset, user = ms["Split"], ms["Dataset"], ms["DataLoader"]
        print(f"| {method} | {split:.3f} | {dataset:.3f} | {user:.3f} | {dataset / split:.3f} | {user / split:.3f} |")
    trainer = make(bench, "fs", fsmtl.Trainer)
    trainer.fit(bench.train, epochs=1, batch_size=64)
    with tempfile.TemporaryDirectory() as directory:
        times = []
        for _ in range(20):
            start = time.perf_counter()
            path = trainer.save_checkpoint(directory, keep_last=2)
            times.append((time.perf_counter() - start) * 1e3)
        size = path.stat().st_size
    params = sum(p.numel() for p in trainer.model.parameters())
    print(
        f"\ncheckpoint write (FS, {params} parameters, Adam state, masks): median {statistics.median(times):.2f} ms, "
        f"{size / 1024:.0f} KiB; one training step is {split:.2f} ms"
    )


if __name__ == "__main__":
    main()
