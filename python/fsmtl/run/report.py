"""Results of :func:`fsmtl.run.experiment.run_experiment` as a table, JSON, CSV and figures.

Every file is written atomically (a temporary file beside it, fsync, rename): a reader or a kill
sees the previous file or the complete new one, never a torn one.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from ..engine.checkpoint import atomic_write_text
from ..files import write_atomically
from ..strategies import Method, get_method
from ..tasks.metrics import METRIC_DIRECTION


def _known(method: str) -> Method | None:
    try:
        return get_method(method)
    except ValueError:  # a results file of a method this installation does not know
        return None


def method_label(method: str) -> str:
    """The table label of ``method`` (its name when this installation does not know it)."""
    known = _known(method)
    return known.label if known is not None else method


def _single_task(method: str) -> bool:
    known = _known(method)
    return known is not None and known.single_task


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
        p = "100%" if r["keep_ratio"] is None else f"{r['keep_ratio']:.0%}"
        p = "-" if _single_task(method) and r["keep_ratio"] is None else p  # STL; STL-FS has its p
        cells = [f"{r['test_mean'][n]:.4f} +- {_std(r['test_std'][n])}" for n in names]
        rank = "-" if r.get("avg_rank") is None else f"{r['avg_rank']:.2f}"
        rows.append([method_label(method), p, *cells, rank])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    bench = results["benchmark"]
    title = (
        f"{bench['name']}: {len(bench['tasks'])} tasks, test set, mean +- std over "
        f"{len(results['config']['seeds'])} seeds (^ higher is better, v lower)"
    )
    notes = [f"warning: {w}" for w in results.get("warnings", [])]
    return "\n".join([title, *lines, *unit_lines(results), *paired_lines(results), *notes])


def unit_lines(results: dict) -> list[str]:
    """For tasks that record their scale (QM9): the per-target test MAE in published units, Delta M%
    and mean rank (:mod:`fsmtl.run.units`); empty otherwise."""
    from .units import format_unit_table, published_reference, task_scales, unit_summary

    tasks = results["benchmark"]["tasks"]
    scales = task_scales(tasks)
    if scales is None:
        return []
    runs = {m: r["test_per_seed_per_task"] for m, r in results["methods"].items()}
    ranked = [m for m in runs if not _single_task(m)]
    summary = unit_summary(
        runs, scales, reference="stl" if "stl" in runs else None, published=published_reference(results), ranked=ranked
    )
    labels = {m: method_label(m) for m in runs}
    return [
        "",
        "test MAE per target in published units (mean ± std over seeds); ΔM%: mean relative MAE change against STL "
        "(lower is better); mean rank over the targets (STL not ranked)",
        *format_unit_table(summary, tasks, labels),
    ]


def _std(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def paired_lines(results: dict) -> list[str]:
    """The protocol and, per method, its paired tests against MTL and FS over the reported seeds
    (empty for results without them)."""
    protocol = results.get("protocol")
    if protocol is None:
        return []
    from .stats import format_p

    seeds = ",".join(map(str, protocol["seeds"]))
    holm = holm_adjusted(results)
    lines = [
        "",
        f"std: sample std (ddof=1) over the reported seeds {seeds}; keep ratios chosen on validation with "
        f"seeds {','.join(map(str, protocol['select_seeds']))}",
        "paired tests of the per-seed score (mean primary metric over tasks), two-sided: p of t-test / Wilcoxon, "
        f"then [Holm-corrected over the {len(holm)} distinct comparisons of this table]",
    ]
    for method, r in results["methods"].items():
        cells = []
        for key, test in r.get("paired", {}).items():
            wins = f"{test['wins']}/{test['n']} seeds better"
            adjusted = holm.get(frozenset((method, key.removeprefix("vs_"))), {})
            cells.append(
                f"{key.replace('_', ' ')}: {format_p(test['ttest'])} / {format_p(test['wilcoxon'])} "
                f"[{format_p(adjusted.get('ttest'), 'p_holm')} / {format_p(adjusted.get('wilcoxon'), 'p_holm')}] "
                f"({wins})"
            )
        if cells:
            lines.append(f"  {method_label(method)}: " + "; ".join(cells))
    return lines


def holm_adjusted(results: dict) -> dict[frozenset, dict]:
    """The paired tests of ``results`` as one family (A vs B and B vs A counted once), each with
    its Holm-corrected p-values (:func:`fsmtl.run.stats.holm_family`), by the pair of methods."""
    import copy

    from .stats import holm_family

    family: dict[frozenset, dict] = {}
    for method, r in results["methods"].items():
        for key, test in r.get("paired", {}).items():
            family.setdefault(frozenset((method, key.removeprefix("vs_"))), copy.deepcopy(test))
    holm_family(list(family.values()))
    return family


def write_json(results: dict, path: Path) -> None:
    atomic_write_text(json.dumps(results, indent=2), path)


def write_csv(results: dict, path: Path) -> None:
    """Test metrics, one row per (method, statistic, task): ``statistic`` is ``mean`` or ``std``
    over the seeds, or ``seed`` with the seed in ``seed``; ``task`` is a task's name or ``average``
    (the mean over tasks, as in the table). ``keep_ratio`` is the one chosen on validation (empty
    for dense methods); ``avg_rank`` is on the mean rows of the average."""
    tasks = [t["name"] for t in results["benchmark"]["tasks"]]
    names = _metric_names(results)
    seeds = results["config"]["seeds"]
    f = io.StringIO(newline="")  # the rows go to memory, then to the file at once (atomically)
    writer = csv.writer(f)
    writer.writerow(["method", "keep_ratio", "statistic", "seed", "task", *names, "avg_rank"])

    def row(method, r, statistic, seed, task, metrics, rank=""):
        writer.writerow([method, r["keep_ratio"], statistic, seed, task, *[metrics.get(n, "") for n in names], rank])

    for method, r in results["methods"].items():
        rank = "" if r.get("avg_rank") is None else r["avg_rank"]
        for task, metrics in zip(tasks, r["test_per_task"]):
            row(method, r, "mean", "", task, metrics)
        row(method, r, "mean", "", "average", r["test_mean"], rank)
        for task, metrics in zip(tasks, r.get("test_per_task_std", [])):
            row(method, r, "std", "", task, metrics)
        row(method, r, "std", "", "average", r["test_std"])
        per_task = r.get("test_per_seed_per_task", [])
        for i, seed in enumerate(seeds):
            for task, metrics in zip(tasks, per_task[i] if i < len(per_task) else []):
                row(method, r, "seed", seed, task, metrics)
            row(method, r, "seed", seed, "average", r["test_per_seed"][i])
    write_atomically(path, "w", lambda out: out.write(f.getvalue()), newline="")


def _bounded(metric: str) -> bool:
    """Metrics that live in [0, 1] (accuracies, F-scores, IoU), plotted on a full 0-1 axis."""
    return METRIC_DIRECTION.get(metric, True)


def plot_figures(results: dict, out_dir: Path) -> list[Path]:
    """Per-task primary metric per method (bars: mean over seeds, error bars: std over seeds, on an
    axis from 0), and for each sparse method the task-by-task mask overlap averaged over the seeds,
    with the overlap random masks would have marked on the colour bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    paths = []
    tasks = [t["name"] for t in results["benchmark"]["tasks"]]
    n_seeds = len(results["config"]["seeds"])
    metric = "f1" if "f1" in _metric_names(results) else _metric_names(results)[0]
    methods = list(results["methods"])
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(tasks) * len(methods) / 3), 4))
    width = 0.8 / len(methods)
    x = np.arange(len(tasks))
    for i, m in enumerate(methods):
        r = results["methods"][m]
        vals = [pt.get(metric, np.nan) for pt in r["test_per_task"]]
        errs = [pt.get(metric, np.nan) for pt in r.get("test_per_task_std", [{}] * len(tasks))]
        errs = [np.nan if e is None else e for e in errs]  # one seed: no std
        label = method_label(m) + ("" if r["keep_ratio"] is None else f" (p={r['keep_ratio']:g})")
        ax.bar(x + i * width, vals, width, yerr=errs, capsize=2, label=label)
    if _bounded(metric):
        ax.set_ylim(0.0, 1.0)  # the whole range: differences show against the error bars, not a cut axis
    else:
        ax.set_ylim(bottom=0.0)
    ax.set_xticks(x + width * (len(methods) - 1) / 2, tasks, rotation=30, ha="right")
    ax.set_ylabel(f"test {metric} ({'higher' if METRIC_DIRECTION.get(metric, True) else 'lower'} is better)")
    ax.set_title(
        f"{results['benchmark']['name']}: test {metric} per task\n"
        f"bars: mean over {n_seeds} seed(s), error bars: std over seeds",
        fontsize="medium",
    )
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    paths.append(_save(fig, out_dir / f"per_task_{metric}.png"))
    sparse = [m for m in methods if (results["methods"][m].get("mask") or {}).get("overlap")]
    for m in sparse:
        mask = results["methods"][m]["mask"]
        overlap = np.array(mask["overlap"])
        seeds = mask.get("overlap_seeds", 1)
        random = mask.get("random_overlap")
        fig, ax = plt.subplots(figsize=(2 + 0.6 * len(tasks), 0.6 * len(tasks) + 1.2))
        im = ax.imshow(overlap, vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(range(len(tasks)), tasks, rotation=45, ha="right")
        ax.set_yticks(range(len(tasks)), tasks)
        for (i, j), v in np.ndenumerate(overlap):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="w" if v < 0.6 else "k", fontsize=7)
        p = results["methods"][m]["keep_ratio"]
        reference = "" if random is None else f"; random masks: {random:.2f}"
        ax.set_title(
            f"{method_label(m)} final masks, p={p:g}: Jaccard overlap,\nmean over {seeds} seed(s){reference}",
            fontsize="medium",
        )
        bar = fig.colorbar(im, ax=ax)
        if random is not None:
            bar.ax.axhline(random, color="red", linewidth=2)
            bar.ax.text(
                1.1, random, "random", color="red", va="center", fontsize=7, transform=bar.ax.get_yaxis_transform()
            )
        fig.tight_layout()
        paths.append(_save(fig, out_dir / f"overlap_{m}.png"))
    paths += plot_keep_ratio_curves(results, out_dir)
    paths += plot_unit_errors(results, out_dir)
    return paths


def plot_keep_ratio_curves(results: dict, out_dir: Path) -> list[Path]:
    """The paper's Fig. 4 from the selection runs: per sparse method, the test score at each keep
    ratio (mean +- sample std over the selection seeds; these scores never chose anything), the
    chosen ratio circled, and MTL's score over the reported seeds as a line. None without a choice."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    curves = {}
    for m, r in results["methods"].items():
        runs = [x for x in r.get("runs", []) if x["role"] == "selection"]
        ratios = sorted({x["keep_ratio"] for x in runs})
        if len(ratios) > 1:
            scores = [[x["test_score"] for x in runs if x["keep_ratio"] == p] for p in ratios]
            curves[m] = (ratios, scores, r["keep_ratio"])
    if not curves:
        return []
    fig, ax = plt.subplots(figsize=(6, 4))
    for m, (ratios, scores, chosen) in curves.items():
        means = [float(np.mean(s)) for s in scores]
        errs = [float(np.std(s, ddof=1)) if len(s) > 1 else np.nan for s in scores]
        line = ax.errorbar(
            ratios, means, yerr=errs, marker="o", capsize=3, label=f"{method_label(m)} (chosen p={chosen:g})"
        )
        ax.plot([chosen], [means[ratios.index(chosen)]], "o", ms=12, mfc="none", color=line[0].get_color())
    if "mtl" in results["methods"]:
        mtl = results["methods"]["mtl"]
        ax.axhline(mtl["test_score_mean"], color="k", linestyle="--", label="MTL (reported seeds)")
        if mtl.get("test_score_std"):
            lo, hi = mtl["test_score_mean"] - mtl["test_score_std"], mtl["test_score_mean"] + mtl["test_score_std"]
            ax.axhspan(lo, hi, color="k", alpha=0.08)
    seeds = ",".join(map(str, results.get("protocol", {}).get("select_seeds", [])))
    ax.set_xlabel("keep ratio p")
    ax.set_ylabel("test score (mean primary metric over tasks,\nsigned: higher is better)")
    ax.set_title(f"{results['benchmark']['name']}: test score by keep ratio, selection seeds {seeds}", fontsize="small")
    ax.legend(fontsize="small")
    fig.tight_layout()
    return [_save(fig, out_dir / "keep_ratio_curve.png")]


def plot_unit_errors(results: dict, out_dir: Path) -> list[Path]:
    """For tasks that record their scale (QM9): each method's test MAE per target relative to STL's
    (or to the first method's without STL), mean over seeds, on a log axis; none otherwise."""
    from .units import published_mae, task_scales

    scales = task_scales(results["benchmark"]["tasks"])
    if scales is None:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    tasks = [t["name"] for t in results["benchmark"]["tasks"]]
    methods = list(results["methods"])
    maes = {
        m: np.mean([published_mae(run, scales) for run in r["test_per_seed_per_task"]], axis=0)
        for m, r in results["methods"].items()
    }
    reference = "stl" if "stl" in maes else methods[0]
    fig, ax = plt.subplots(figsize=(max(6, 0.3 * len(tasks) * len(methods)), 4))
    width = 0.8 / len(methods)
    x = np.arange(len(tasks))
    for i, m in enumerate(methods):
        ax.bar(x + i * width, maes[m] / maes[reference], width, label=method_label(m))
    ax.axhline(1.0, color="k", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xticks(x + width * (len(methods) - 1) / 2, tasks, rotation=30, ha="right")
    ax.set_ylabel(f"test MAE / {method_label(reference)}'s (lower is better)")
    ax.set_title(
        f"{results['benchmark']['name']}: test MAE per target relative to {method_label(reference)}, "
        f"mean over {len(results['config']['seeds'])} seed(s)",
        fontsize="medium",
    )
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return [_save(fig, out_dir / "relative_mae.png")]


def _save(fig, path: Path) -> Path:
    """``fig`` as a PNG at ``path``, atomically; the figure is closed."""
    import matplotlib.pyplot as plt

    try:
        return write_atomically(path, "wb", lambda f: fig.savefig(f, format="png", dpi=120))
    finally:
        plt.close(fig)
