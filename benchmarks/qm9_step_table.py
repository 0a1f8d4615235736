"""Per-step cost of every method of the QM9 study on the bonded and the complete graph.

For each (graph, method): a Trainer on the MPNN trunk (width 64, 11 heads), batch 120 molecules,
keep ratio 0.5, one epoch of ``--steps`` steps whose first step starts with the mask update
(sparse methods; no warm-up). Reported per step: CPU seconds of this process
(``time.process_time``, robust to other load on a shared machine) and wall seconds, from the
optimizer steps that close each step, averaged over the steps after the first; and the mask
update's own cost (the first step minus a plain step).

    python benchmarks/qm9_step_table.py --out benchmarks/results/qm9-steps.json [--threads 1]

Results are written after every measurement, so a partial table survives an interruption.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

import fsmtl
from fsmtl.data import load_benchmark
from fsmtl.models import build_model
from fsmtl.strategies import MaskSchedule, MethodOptions, get_method

METHODS = ("mtl", "fs", "mgda-ub", "rs", "rlw", "gradnorm", "mtl-turns", "fs-avg", "efs", "cagrad", "nashmtl")


def measure(bench, method: str, graph: str, steps: int) -> dict:
    torch.manual_seed(0)
    model = build_model(bench, backbone="mpnn" if graph == "bonded" else "mpnn-complete")
    strategy = get_method(method).build(
        MethodOptions(keep_ratio=0.5, schedule=MaskSchedule(warmup=0, every=1000), samples=120)
    )
    trainer = fsmtl.Trainer(model, bench.tasks, strategy, torch.optim.Adam(model.parameters(), 1e-3), seed=0)
    marks: list[tuple[float, float]] = []
    calls = [0]
    per_step = len(bench.tasks) if strategy.in_turns else 1
    step = trainer.optimizer.step

    def timed(*args, **kwargs):
        out = step(*args, **kwargs)
        calls[0] += 1
        if calls[0] % per_step == 0:
            marks.append((time.process_time(), time.perf_counter()))
        return out

    trainer.optimizer.step = timed
    start = (time.process_time(), time.perf_counter())
    trainer.fit(bench.train, epochs=1, batch_size=120, progress=None)
    points = [start, *marks]
    cpu = [b[0] - a[0] for a, b in zip(points, points[1:])]
    wall = [b[1] - a[1] for a, b in zip(points, points[1:])]
    masked_cpu, masked_wall = cpu[1:], wall[1:]  # after the first step (which starts with the mask update)
    plain_cpu = sum(masked_cpu) / len(masked_cpu)
    out = {
        "method": method,
        "graph": graph,
        "cpu_s_per_step": plain_cpu,
        "wall_s_per_step": sum(masked_wall) / len(masked_wall),
        "mask_update_cpu_s": cpu[0] - plain_cpu if get_method(method).sparse else None,
        "steps_timed": len(masked_cpu),
    }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3, help="steps timed (batches of 120), at least 2")
    parser.add_argument("--graphs", default="bonded,complete")
    parser.add_argument("--methods", default=",".join(METHODS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bench = load_benchmark("qm9", n_train=120 * args.steps, n_val=10, n_test=10)
    previous = json.loads(args.out.read_text())["rows"] if args.out.is_file() else []
    table = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU(s), torch {torch.__version__}, "
        f"{args.threads} thread(s)",
        "batch": 120,
        "rows": previous,
    }
    for graph in args.graphs.split(","):
        for method in args.methods.split(","):
            if any(r["method"] == method and r["graph"] == graph for r in table["rows"]):
                continue  # measured by an earlier invocation
            load = os.getloadavg()[0]
            row = measure(bench, method, graph, args.steps)
            row["load_average"] = load
            table["rows"].append(row)
            args.out.write_text(json.dumps(table, indent=1))
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
