"""The evaluation protocol that ``fsmtl run`` and ``fsmtl study`` both follow.

Hyper-parameters are chosen on validation with *selection* seeds and reported on other,
*reported* seeds: for a method with several candidate keep ratios, each ratio is trained with
every selection seed and the ratio with the best mean validation score (the mean over tasks of
each task's primary metric, signed so that higher is better) is kept; no test score is read to
choose. The chosen ratio (the only one, for dense methods) is then trained with every reported
seed, and those runs' test scores are what the tables show. A study may also report every
candidate on the reported seeds (its keep-ratio curve).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..strategies import get_method
from ..tasks import Task, average_metrics, primary_score


def check_seed_split(seeds: Sequence[int], select_seeds: Sequence[int]) -> None:
    """The protocol's seed split: selection seeds choose hyper-parameters on validation, reported
    seeds give the test scores; no seed may do both (nor appear twice in one list)."""
    if not select_seeds:
        raise ValueError("select_seeds must not be empty (the seeds that choose the keep ratio on validation)")
    for name, values in (("seeds", seeds), ("select_seeds", select_seeds)):
        if len(set(values)) != len(values):
            raise ValueError(f"{name} has repeated seeds: {list(values)}")
    shared = sorted(set(seeds) & set(select_seeds))
    if shared:
        raise ValueError(
            f"seeds {shared} are both reported and used for selection: reported seeds must be fresh "
            "(choose --select-seeds apart from --seeds)"
        )


def candidate_ratios(method: str, keep_ratios: Sequence[float]) -> list[float]:
    """The keep ratios ``method`` chooses from: the grid for a method with a keep ratio, ``[1.0]``
    for a dense one."""
    return list(keep_ratios) if get_method(method).sparse else [1.0]


def planned_runs(method: str, keep_ratios: Sequence[float], select_seeds: Sequence[int], seeds: Sequence[int]) -> int:
    """Training runs of ``method`` under the protocol: each keep ratio on each selection seed (when
    there is a choice), then the chosen one on each reported seed."""
    ratios = len(candidate_ratios(method, keep_ratios))
    return (ratios * len(select_seeds) if ratios > 1 else 0) + len(seeds)


@dataclass
class MethodOutcome:
    """One method under the protocol: the chosen keep ratio, the mean validation score of each
    candidate (empty without a choice) and the reported runs by keep ratio (the chosen one, and
    every candidate with a curve), one run per reported seed."""

    chosen: float
    val_scores: dict[float, float]
    reported: dict[float, list]


def run_protocol(
    method: str,
    keep_ratios: Sequence[float],
    select_seeds: Sequence[int],
    seeds: Sequence[int],
    train: Callable[[int, float, str], object],
    val_score: Callable[[object], float],
    *,
    curve: bool = False,
) -> MethodOutcome:
    """Choose ``method``'s keep ratio on validation and report it (see the module docstring).

    Args:
        train: ``train(seed, keep_ratio, role)`` trains one run (``role`` is ``"selection"`` or
            ``"report"``) and returns its record.
        val_score: a run record's validation score (higher is better).
        curve: also report every candidate keep ratio on the reported seeds.
    """
    ratios = candidate_ratios(method, keep_ratios)
    val_scores = {}
    if len(ratios) > 1:
        for p in ratios:
            runs = [train(s, p, "selection") for s in select_seeds]
            val_scores[p] = statistics.mean(val_score(r) for r in runs)
        chosen = max(val_scores, key=val_scores.get)  # first of equal scores: the earlier ratio
    else:
        chosen = ratios[0]
    reported = {p: [train(s, p, "report") for s in seeds] for p in (ratios if curve else [chosen])}
    return MethodOutcome(chosen, val_scores, reported)


def score_record(tasks: Sequence[Task], method: str, seed: int, keep_ratio: float, role: str, run: dict) -> dict:
    """One training run's scores as kept in ``results.json`` and study cells: validation and test
    primary scores (mean over tasks, higher is better) and the test metrics averaged over tasks."""
    return {
        "method": method,
        "seed": seed,
        "keep_ratio": keep_ratio,
        "role": role,
        "val_score": primary_score(tasks, run["val"]),
        "test_score": primary_score(tasks, run["test"]),
        "test": average_metrics(run["test"]),
    }
