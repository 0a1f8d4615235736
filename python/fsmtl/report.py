"""Results of :func:`fsmtl.experiment.run_experiment` as a table, JSON, CSV and figures."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from .metrics import METRIC_DIRECTION
from .strategies import METHODS


def _label(method: str) -> str:
    return METHODS[method].label if method in METHODS else method


def _single_task(method: str) -> bool:
    return method in METHODS and METHODS[method].single_task


def _metric_names(results: dict) -> list[str]:
    first = next(iter(results["methods"].values()))
    return list(first["test_mean"])


def format_table(results: dict) -> str:
    """A plain-text table shaped like the paper's Table 1: mean +- std per metric, p, average rank."""
    names = _metric_names(results)
    arrows = [f"{n} {'^' if METRIC_DIRECTION.get(n, True) else 'v'}" for n in names]
    header = ["Model", "p", *arrows, "Avg Rank"]
    rows = [header]
    for method, r in results["methods"].items():
        p = "-" if _single_task(method) else "100%" if r["keep_ratio"] is None else f"{r['keep_ratio']:.0%}"
        cells = [f"{r['test_mean'][n]:.4f} +- {r['test_std'][n]:.4f}" for n in names]
        rank = "-" if r.get("avg_rank") is None else f"{r['avg_rank']:.2f}"
        rows.append([_label(method), p, *cells, rank])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    bench = results["benchmark"]
    title = (
        f"{bench['name']}: {len(bench['tasks'])} tasks, test set, mean +- std over "
        f"{len(results['config']['seeds'])} seeds (^ higher is better, v lower)"
    )
    return "\n".join([title, *lines])


def write_json(results: dict, path: Path) -> None:
    path.write_text(json.dumps(results, indent=2))


def write_csv(results: dict, path: Path) -> None:
    """One row per method and task (test means), plus the task average."""
    tasks = [t["name"] for t in results["benchmark"]["tasks"]]
    names = _metric_names(results)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "keep_ratio", "task", *names, "avg_rank"])
        for method, r in results["methods"].items():
            for task, metrics in zip(tasks, r["test_per_task"]):
                writer.writerow([method, r["keep_ratio"], task, *[metrics.get(n, "") for n in names], ""])
            writer.writerow(
                [method, r["keep_ratio"], "average", *[r["test_mean"][n] for n in names], r.get("avg_rank")]
            )


def plot_figures(results: dict, out_dir: Path) -> list[Path]:
    """Per-task primary metric per method (bars), and the task-by-task mask overlap of FS."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    paths = []
    tasks = [t["name"] for t in results["benchmark"]["tasks"]]
    metric = "f1" if "f1" in _metric_names(results) else _metric_names(results)[0]
    methods = list(results["methods"])
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(tasks) * len(methods) / 3), 4))
    width = 0.8 / len(methods)
    x = np.arange(len(tasks))
    lowest = 1.0
    for i, m in enumerate(methods):
        vals = [pt.get(metric, np.nan) for pt in results["methods"][m]["test_per_task"]]
        lowest = min(lowest, float(np.nanmin(vals)))
        ax.bar(x + i * width, vals, width, label=_label(m))
    if METRIC_DIRECTION.get(metric, True) and 0.0 <= lowest <= 1.0:
        ax.set_ylim(max(0.0, lowest - 0.05), 1.0)  # zoom in: the differences between methods are small
    ax.set_xticks(x + width * (len(methods) - 1) / 2, tasks, rotation=30, ha="right")
    ax.set_ylabel(f"test {metric}")
    ax.set_title(f"{results['benchmark']['name']}: per-task {metric}")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    paths.append(out_dir / f"per_task_{metric}.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    sparse = [m for m in methods if (results["methods"][m].get("mask") or {}).get("overlap")]
    for m in sparse:
        overlap = np.array(results["methods"][m]["mask"]["overlap"])
        fig, ax = plt.subplots(figsize=(1 + 0.6 * len(tasks), 0.6 * len(tasks) + 0.8))
        im = ax.imshow(overlap, vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(range(len(tasks)), tasks, rotation=45, ha="right")
        ax.set_yticks(range(len(tasks)), tasks)
        for (i, j), v in np.ndenumerate(overlap):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="w" if v < 0.6 else "k", fontsize=7)
        ax.set_title(f"{_label(m)} mask overlap (Jaccard), p={results['methods'][m]['keep_ratio']:.0%}")
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        paths.append(out_dir / f"overlap_{m}.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths
