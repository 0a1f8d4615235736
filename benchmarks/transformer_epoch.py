"""The Trainer's whole epoch on a transformer trunk: FS against MTL.

A small ``nn.TransformerEncoder`` trunk (``nn.Embedding`` of 100 tokens, 2 layers, d = 32, 2
heads, feed-forward 64, sequences of 16 tokens, mean over positions), ``--tasks`` generated binary
tasks on the tokens (each a random linear rule on token counts), ``--samples`` training samples,
batch 64. MTL (equal weights, one backward of the summed losses per batch) and FS (keep ratio
0.5, Fisher on 256 samples, masks recomputed at the start of every epoch after one dense warm-up
epoch) in its two updates: ``fs`` (the paper's: tasks in turns on shared inputs, T forward and
backward passes per batch) and ``fs-avg`` (one forward, the masked average of the T task
gradients). Each epoch after the first is timed (median of ``--epochs - 1``), with the time FS
spends in its mask updates (Fisher estimate and top-K, timed around the strategy's ``update_mask``).

Run: ``OMP_WAIT_POLICY=PASSIVE OMP_NUM_THREADS=1 python benchmarks/transformer_epoch.py``. Prints a
table and writes ``benchmarks/results/transformer-epoch-<date>.json`` (``--out`` to choose).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import fsmtl
from fsmtl.tasks import Task

VOCAB, LENGTH, WIDTH = 100, 16, 32


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, WIDTH)
        layer = nn.TransformerEncoderLayer(WIDTH, 2, 2 * WIDTH, dropout=0.1, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)

    def forward(self, tokens):
        return self.enc(self.emb(tokens)).mean(1)


def data(num_tasks: int, n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (n, LENGTH), generator=g)
    counts = torch.zeros(n, VOCAB).scatter_add_(1, tokens, torch.ones(n, LENGTH))
    rules = torch.randn(VOCAB, num_tasks, generator=g)
    scores = counts @ rules
    ys = [(scores[:, t] > scores[:, t].median()).float() for t in range(num_tasks)]
    return torch.utils.data.TensorDataset(tokens, *ys)


def strategy(method: str):
    if method == "mtl":
        return fsmtl.EqualWeighting()
    schedule = fsmtl.MaskSchedule(warmup=1, every=1)
    update = "average" if method == "fs-avg" else "paper"
    return fsmtl.FisherSparse(0.5, estimator="fs", samples=256, schedule=schedule, update=update)


def epochs(method: str, num_tasks: int, train, count: int) -> dict:
    torch.manual_seed(0)
    tasks = [Task(f"t{t}", "binary", 1) for t in range(num_tasks)]
    model = fsmtl.MultiTaskModel(Encoder(), [nn.Linear(WIDTH, 1) for _ in tasks])
    chosen = strategy(method)
    mask_s: list[float] = []
    if method != "mtl":  # the mask update (Fisher estimate + top-K), timed where the strategy runs it
        update = chosen.update_mask

        def timed(*args, **kwargs):
            start = time.perf_counter()
            record = update(*args, **kwargs)
            mask_s.append(time.perf_counter() - start)
            return record

        chosen.update_mask = timed
    trainer = fsmtl.Trainer(model, tasks, chosen, torch.optim.Adam(model.parameters(), 1e-3), homogeneous=True)
    times = []
    for _ in range(count):
        start = time.perf_counter()
        trainer.fit(train, epochs=1, batch_size=64, progress=None)
        times.append(time.perf_counter() - start)
    return {
        "params": sum(p.numel() for p in model.trunk.parameters()),
        "epoch_s": times,
        "median_s": statistics.median(times[1:]),
        "mask_update_s": mask_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=3)
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    train = data(args.tasks, args.samples)
    load_before = os.getloadavg()[0]
    rows = {m: epochs(m, args.tasks, train, args.epochs) for m in ("mtl", "fs", "fs-avg")}
    mtl = rows["mtl"]["median_s"]
    print(f"trunk {rows['mtl']['params']} parameters, T = {args.tasks}, {args.samples} samples, batch 64")
    print("| method | epoch s (median) | / MTL | / (T x MTL) | mask updates s |")
    print("|---|---:|---:|---:|---|")
    for m, r in rows.items():
        masks = ", ".join(f"{s:.2f}" for s in r["mask_update_s"]) or "-"
        ratio = r["median_s"] / mtl
        print(f"| {m} | {r['median_s']:.2f} | {ratio:.2f} | {ratio / args.tasks:.2f} | {masks} |")
    report = {
        "rows": rows,
        "tasks": args.tasks,
        "samples": args.samples,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        "load_before": round(load_before, 2),
        "load_after": round(os.getloadavg()[0], 2),
    }
    print(f"1-min load {report['load_before']} -> {report['load_after']}")
    out = Path(args.out or Path(__file__).parent / "results" / f"transformer-epoch-{report['date']}.json")
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
