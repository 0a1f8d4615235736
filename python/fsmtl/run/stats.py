"""Spreads and paired significance tests over seeds, as the evaluation protocol reports them.

Every method is trained on the same reported seeds, so two methods' scores on one seed form a
pair; :func:`paired_tests` compares them with the paired t-test and the Wilcoxon signed-rank test
(both two-sided, :mod:`scipy.stats`). Cases where a test is undefined give ``None`` with the reason
instead of a number scipy would return with a warning (NaN) or a misleading p-value. A report that
makes several comparisons also gives their p-values with Holm's correction over the family
(:func:`holm`, :func:`holm_family`).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence


def sample_std(values: Sequence[float]) -> float | None:
    """Sample standard deviation (ddof = 1); None with fewer than two values."""
    values = [float(v) for v in values]
    if len(values) < 2:
        return None
    mean = math.fsum(values) / len(values)
    return math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _undefined(reason: str) -> dict:
    return {"statistic": None, "p": None, "reason": reason}


def paired_tests(a: Sequence[float], b: Sequence[float]) -> dict:
    """Paired two-sided tests of ``a`` against ``b`` (one value per seed, same seed order).

    Returns ``{"n", "mean_diff", "wins", "losses", "ttest": {...}, "wilcoxon": {...}}`` where
    ``mean_diff`` is ``mean(a - b)``, ``wins``/``losses`` count seeds with ``a > b`` / ``a < b``,
    and each test is ``{"statistic", "p", "reason"}``: ``reason`` is None when the test ran, else
    why it is undefined (fewer than 2 pairs; every difference zero; for the t-test, differences
    with zero variance, where t is +-infinity).
    """
    from scipy import stats

    a, b = [float(v) for v in a], [float(v) for v in b]
    if len(a) != len(b):
        raise ValueError(f"paired_tests needs one value per seed on both sides, got {len(a)} and {len(b)}")
    diffs = [x - y for x, y in zip(a, b)]
    out = {
        "n": len(diffs),
        "mean_diff": statistics.mean(diffs) if diffs else None,
        "wins": sum(d > 0 for d in diffs),
        "losses": sum(d < 0 for d in diffs),
    }
    if len(diffs) < 2:
        out["ttest"] = out["wilcoxon"] = _undefined(f"{len(diffs)} paired seed(s): a paired test needs at least 2")
        return out
    if all(d == 0 for d in diffs):
        out["ttest"] = out["wilcoxon"] = _undefined("every paired difference is zero (identical scores)")
        return out
    spread = max(diffs) - min(diffs)
    if spread <= 1e-12 * max(abs(d) for d in diffs):  # equal up to rounding: scipy's t would be noise
        out["ttest"] = _undefined("the paired differences are all equal (zero variance): t is infinite")
    else:
        t = stats.ttest_rel(a, b)
        out["ttest"] = {"statistic": float(t.statistic), "p": float(t.pvalue), "reason": None}
    w = stats.wilcoxon(diffs)  # zero differences dropped ("wilcox"), exact distribution for small n
    out["wilcoxon"] = {"statistic": float(w.statistic), "p": float(w.pvalue), "reason": None}
    return out


def holm(pvalues: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjustment (Holm 1979) of a family of p-values, in their order: sorted
    ascending, the i-th smallest (0-based) of the m defined ones becomes ``max_{j <= i} min(1,
    (m - j) p_(j))``, which controls the family-wise error rate at any level without assuming
    independence. ``None`` (an undefined test) stays None and is not counted in m."""
    defined = sorted((float(p), i) for i, p in enumerate(pvalues) if p is not None)
    out: list[float | None] = [None] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(defined):
        running = max(running, min(1.0, (len(defined) - rank) * p))
        out[i] = running
    return out


def holm_family(tests: Sequence[dict]) -> None:
    """Adds ``p_holm`` to the t-test and to the Wilcoxon test of every :func:`paired_tests` result
    in ``tests`` (one family: the comparisons one table reports), each test kind adjusted on its own."""
    for kind in ("ttest", "wilcoxon"):
        adjusted = holm([t[kind]["p"] for t in tests])
        for t, p in zip(tests, adjusted):
            t[kind]["p_holm"] = p


def format_p(test: dict | None, key: str = "p") -> str:
    """``0.012`` / ``<0.001`` / ``n/a`` for one test of :func:`paired_tests` (``key="p_holm"``:
    its Holm-adjusted p-value, see :func:`holm_family`)."""
    if test is None or test.get(key) is None:
        return "n/a"
    p = test[key]
    return "<0.001" if p < 0.001 else f"{p:.3f}"
