"""Per-target errors in published units, Delta M% and the mean rank, for benchmarks whose tasks
are regressions on standardised targets that record their scale (QM9: :class:`fsmtl.data.qm9.QM9Task`).

* MAE in published units: the MAE on standardised targets times the task's ``scale`` (the
  training standard deviation times the factor to the published unit, e.g. eV to meV).
* Delta M% (Maninis et al. 2019; Nash-MTL's ``delta_fn`` for QM9): ``100 / K * sum_k (-1)^{h_k}
  (M_k - B_k) / B_k`` over the K targets, with ``B`` the single-task reference and ``h_k = 1``
  when higher is better (never on QM9, where every target is an MAE). Lower is better; 0 is STL.
  Computed per reported seed against the reference's mean over its seeds, then averaged.
* Mean rank: each method's rank (1 = lowest MAE) on every target among the ranked methods,
  averaged over the targets (Nash-MTL's and FAMO's "MR"); STL is not ranked.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence

import numpy as np
from scipy.stats import rankdata

from .stats import sample_std


def task_scales(tasks: Sequence[Mapping]) -> list[float] | None:
    """The scale of every task (``tasks`` as ``results["benchmark"]["tasks"]``), or None when a
    task records none (a benchmark in plain units)."""
    scales = [t.get("scale") for t in tasks]
    return None if any(s is None for s in scales) else [float(s) for s in scales]


def published_mae(per_task: Sequence[Mapping[str, float]], scales: Sequence[float]) -> list[float]:
    """One run's per-target MAE in published units, from its per-task metrics (``mae`` standardised)."""
    return [float(m["mae"]) * s for m, s in zip(per_task, scales, strict=True)]


def delta_m(values: Sequence[float], reference: Sequence[float], higher: Sequence[bool] | None = None) -> float:
    """Delta M% of one method's per-target values against the reference's (see the module docstring)."""
    if len(values) != len(reference) or not values:
        raise ValueError(f"delta_m needs one value per target on both sides, got {len(values)} and {len(reference)}")
    higher = higher if higher is not None else [False] * len(values)
    terms = [(-1.0 if h else 1.0) * (m - b) / b for m, b, h in zip(values, reference, higher)]
    return 100.0 * float(np.mean(terms))


def mean_ranks(per_target: Mapping[str, Sequence[float]]) -> dict[str, float]:
    """Method -> mean over targets of its rank by value (1 = lowest; ties share the mean rank)."""
    methods = list(per_target)
    table = np.array([per_target[m] for m in methods], dtype=np.float64)
    ranks = np.stack([rankdata(table[:, k], method="average") for k in range(table.shape[1])], axis=1)
    return {m: float(r) for m, r in zip(methods, ranks.mean(1))}


def unit_summary(
    runs_by_method: Mapping[str, Sequence[Sequence[Mapping[str, float]]]],
    scales: Sequence[float],
    *,
    reference: str | None = "stl",
    published: Sequence[float] | None = None,
    ranked: Sequence[str] | None = None,
) -> dict[str, dict]:
    """Per method: per-target MAE in published units (mean and sample std over its runs),
    Delta M% against ``reference``'s mean MAE (per run, then mean and std; None without the
    reference), against ``published`` MAEs when given, and the mean rank among ``ranked``
    (default: every method but the reference).

    ``runs_by_method``: method -> one per-task metrics list per reported seed.
    """
    out: dict[str, dict] = {}
    maes = {m: [published_mae(run, scales) for run in runs] for m, runs in runs_by_method.items()}
    means = {m: [statistics.mean(v[k] for v in runs) for k in range(len(scales))] for m, runs in maes.items()}
    base = means.get(reference) if reference is not None else None
    ranked = [m for m in (ranked if ranked is not None else runs_by_method) if m != reference and m in means]
    ranks = mean_ranks({m: means[m] for m in ranked}) if ranked else {}
    for m, runs in maes.items():
        row = {
            "mae": means[m],
            "mae_std": [sample_std([v[k] for v in runs]) for k in range(len(scales))],
            "delta_m": None,
            "delta_m_std": None,
            "delta_m_per_seed": None,
            "mean_rank": ranks.get(m),
        }
        if base is not None:
            per_seed = [delta_m(v, base) for v in runs]
            row.update(delta_m=statistics.mean(per_seed), delta_m_std=sample_std(per_seed), delta_m_per_seed=per_seed)
        if published is not None:
            row["delta_m_published"] = statistics.mean(delta_m(v, published) for v in runs)
        out[m] = row
    return out


def published_reference(results: dict) -> list[float] | None:
    """Nash-MTL's single-task MAEs (:data:`fsmtl.data.qm9.PUBLISHED_STL_MAE`) for a QM9 run on the
    published split (110,000 training molecules), the only setting they are a reference for."""
    from ..data.qm9 import PUBLISHED_STL_MAE

    bench = results["benchmark"]
    options = results.get("config", {}).get("benchmark_options", {})
    if bench["name"] != "qm9" or options.get("n_train") != 110000:
        return None
    return [PUBLISHED_STL_MAE[t["name"]] for t in bench["tasks"]]


def format_unit_table(
    summary: Mapping[str, Mapping], tasks: Sequence[Mapping], labels: Mapping[str, str], *, reference: str = "STL"
) -> list[str]:
    """The per-target table (rows: methods; columns: targets with units, Delta M%, mean rank), as
    Markdown-compatible lines (``|``-separated)."""
    published = any("delta_m_published" in r for r in summary.values())
    header = ["method", *[f"{t['name']} ({t.get('unit', '')})" for t in tasks], f"ΔM% vs {reference}"]
    header += ["ΔM% vs published STL"] if published else []
    header += ["mean rank"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, r in summary.items():
        cells = [labels.get(method, method)]
        for mean, std in zip(r["mae"], r["mae_std"]):
            cells.append(_number(mean) + ("" if std is None else f" ± {_number(std)}"))
        if r["delta_m"] is None:
            cells.append("-")
        else:
            spread = "" if r["delta_m_std"] is None else f" ± {r['delta_m_std']:.1f}"
            cells.append(f"{r['delta_m']:+.1f}{spread}")
        if published:
            cells.append(f"{r['delta_m_published']:+.1f}")
        cells.append("-" if r["mean_rank"] is None else f"{r['mean_rank']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _number(value: float) -> str:
    """Four significant digits, as the published tables print MAEs (0.0671, 60.58, 0.5027), and
    whole numbers from 10,000 on (no exponent)."""
    return f"{value:.0f}" if abs(value) >= 1e4 else f"{value:.4g}"
