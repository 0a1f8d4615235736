"""The summary of one device check (``benchmarks/gpu_check.sh``): every GPU goal, met or missed.

Reads what the check wrote (the bandwidth JSON of ``gpu_bandwidth.py --check``, the step table
JSON of ``step_table.py --device cuda``, the log of ``pytest -m gpu``), prints one line per goal
with the measured value, the target and ``met`` / ``missed`` / ``unmeasured`` (with the reason: a
row missing or in error), writes the same as JSON, and exits with status 1 when a part of the
check failed (``--failed``) or the GPU tests did not all pass; a missed goal is a result, not a
failure of the check.

Goals (P = 1e8 for the kernels; the step for both trunks at T = 2, 8, 40):

* top-K mask (the public function) at most 0.4 ms at k = 10, 50 and 90% of fp32 scores, at
  least 30% of one read of the scores, at least 8x ``torch.topk``; fp16 and bf16 scores no slower
  than fp32;
* Fisher accumulation, masked average and ``masked_accumulate`` at least 85% of a copy of the
  same bytes, fp32 and bf16;
* ``linear_fisher`` no slower than cuBLAS's float32 GEMM on the squared operands, with at most
  twice its error against a float64 product (plus 4 float32 ulps);
* the FSMTL step (``fsmtl-auto``) at most 1.10x the floor of T backward passes, no slower than
  torchjd's UPGrad, its extra memory within ``P + T x largest`` floats; at T = 8 partial top-2
  masking within 1.5x the dense step and ``mask_forward`` within 1.05x its loop;
* the GPU tests pass, and the check ran within its time budget.

``python benchmarks/gpu_check.py --bandwidth B.json --step S.json --tests T.txt --elapsed 300``
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

TOPK_MS = 0.4
TOPK_ONE_READ = 0.30
TOPK_VS_TORCH = 8.0
OF_COPY = 0.85
STEP_FLOOR = 1.10
PARTIAL_DENSE = 1.5
MASK_FORWARD_LOOP = 1.05
FLOAT32_EPS = 2.0**-23


@dataclass
class Goal:
    """One goal: ``status`` is "met", "missed" or "unmeasured" (``measured`` then says why)."""

    group: str
    goal: str
    measured: str
    status: str
    value: float | None = None


def check(group: str, goal: str, value: float | None, ok: bool | None, shown: str, why: str = "") -> Goal:
    if value is None or ok is None:
        return Goal(group, goal, why or "not measured", "unmeasured")
    return Goal(group, goal, shown, "met" if ok else "missed", value)


def rows_by_kernel(bandwidth: dict | None) -> dict[str, dict]:
    """The bandwidth rows at the largest P, by kernel name (rows in error kept, with their error)."""
    if not bandwidth:
        return {}
    rows = bandwidth.get("rows", [])
    sizes = [r["P"] for r in rows if "P" in r and not r["kernel"].startswith("linear_fisher")]
    largest = max(sizes, default=None)
    return {r["kernel"]: r for r in rows if r.get("P") in (largest, None) or r["kernel"].startswith("linear_fisher")}


def missing(rows: dict, name: str) -> str:
    """Why row ``name`` gives no value: absent, in error, or without the field."""
    if name not in rows:
        return f"no row {name}"
    if "error" in rows[name]:
        return f"error: {rows[name]['error'][:80]}"
    return f"{name} lacks the field"


def topk_goals(rows: dict) -> list[Goal]:
    goals = []
    for ratio in (10, 50, 90):
        name = f"topk_mask[k={ratio}%]"
        r = rows.get(name, {})
        ms, one, topk = r.get("ms"), r.get("one_read_ms"), r.get("speedup_vs_torch_topk_cat")
        why = missing(rows, name) if ms is None else ""
        share = one / ms if ms and one else None
        goals += [
            check("top-K", f"k={ratio}% fp32 <= {TOPK_MS} ms", ms, ms is not None and ms <= TOPK_MS, f"{ms} ms", why),
            check(
                "top-K",
                f"k={ratio}% >= {TOPK_ONE_READ:.0%} of one read",
                share,
                share is not None and share >= TOPK_ONE_READ,
                f"{share:.0%}" if share else "",
                why,
            ),
            check(
                "top-K",
                f"k={ratio}% >= {TOPK_VS_TORCH:g}x torch.topk",
                topk,
                topk is not None and topk >= TOPK_VS_TORCH,
                f"{topk}x",
                why,
            ),
        ]
        for dtype in ("float16", "bfloat16"):
            low = f"topk_mask[k={ratio}%,{dtype}]"
            low_ms = rows.get(low, {}).get("ms")
            times = low_ms / ms if low_ms is not None and ms else None
            goals.append(
                check(
                    "top-K",
                    f"k={ratio}% {dtype} no slower than fp32",
                    times,
                    times is not None and times <= 1.0,
                    f"{low_ms} ms ({times:.2f}x fp32)" if times else "",
                    why or (missing(rows, low) if low_ms is None else ""),
                )
            )
    return goals


def bandwidth_goals(rows: dict) -> list[Goal]:
    goals = []
    for label, stem in (
        ("Fisher accumulation", "fisher_accumulate[{}]"),
        ("masked average", "masked_grad_average[T=3,{}]"),
        ("masked_accumulate", "masked_accumulate[{}]"),
    ):
        for dtype in ("float32", "bfloat16"):
            name = stem.format(dtype)
            share = rows.get(name, {}).get("ratio_to_copy")
            goals.append(
                check(
                    "bandwidth",
                    f"{label} {dtype} >= {OF_COPY:.0%} of copy",
                    share,
                    share is not None and share >= OF_COPY,
                    f"{share:.0%} of copy" if share else "",
                    missing(rows, name),
                )
            )
    return goals


def linear_goal(rows: dict) -> Goal:
    goal = "no slower than cuBLAS on squared operands, same accuracy"
    name = next((k for k in rows if k.startswith("linear_fisher[") and "][" not in k), None)
    r = rows.get(name, {}) if name else {}
    speed, err, ref = r.get("speedup_vs_cublas_squared"), r.get("rel_error"), r.get("cublas_rel_error")
    if speed is None or err is None or ref is None:
        why = "no linear_fisher row" if name is None else missing(rows, name)
        if name and "error" not in r:
            why = "row without cuBLAS timing or errors"
        return check("linear_fisher", goal, None, None, "", why)
    accurate = err <= 2 * ref + 4 * FLOAT32_EPS
    shown = f"{speed}x cuBLAS, error {err:.2e} vs cuBLAS {ref:.2e}"
    return check("linear_fisher", goal, speed, speed >= 1.0 and accurate, shown)


STEP_GOALS = (
    f"FSMTL <= {STEP_FLOOR:.2f}x floor",
    "FSMTL no slower than torchjd UPGrad",
    "FSMTL extra memory within P + T x largest",
)
STEP_GOALS_T8 = (f"partial top-2 <= {PARTIAL_DENSE}x dense", f"mask_forward <= {MASK_FORWARD_LOOP}x its loop")


def _ms(res: dict, method: str) -> float | None:
    return res.get(method, {}).get("ms")


def _why(res: dict, *methods: str) -> str:
    """Why a ratio of ``methods`` is missing: a method's error or its absent timing."""
    for m in methods:
        if "error" in res.get(m, {}):
            return f"{m} error: {res[m]['error'][:80]}"
        if _ms(res, m) is None:
            return f"no {m} timing"
    return ""


def _ratio(res: dict, a: str, b: str) -> float | None:
    x, y = _ms(res, a), _ms(res, b)
    return x / y if x and y else None


def step_row_goals(where: str, res: dict, num_tasks: int) -> list[Goal]:
    """The goals of one (trunk, T) row of the step table."""
    floor = _ratio(res, "fsmtl-auto", "floor")
    upgrad = _ratio(res, "fsmtl-auto", "torchjd-upgrad")
    info = res.get("fsmtl-auto", {})
    peak, floor_peak = info.get("peak_mib"), res.get("floor", {}).get("peak_mib")
    extra = peak - floor_peak if peak is not None and floor_peak is not None else None
    bound = (info["P"] + num_tasks * info.get("largest", 0)) * 4 / 2**20 if "P" in info else None
    goals = [
        check(
            "step",
            f"{where} {STEP_GOALS[0]}",
            floor,
            floor is not None and floor <= STEP_FLOOR,
            f"{floor:.2f}x" if floor else "",
            _why(res, "fsmtl-auto", "floor"),
        ),
        check(
            "step",
            f"{where} {STEP_GOALS[1]}",
            upgrad,
            upgrad is not None and upgrad <= 1.0,
            f"{upgrad:.2f}x UPGrad" if upgrad else "",
            _why(res, "fsmtl-auto", "torchjd-upgrad"),
        ),
        check(
            "step",
            f"{where} {STEP_GOALS[2]}",
            extra,
            extra is not None and bound is not None and extra <= bound,
            f"+{extra:.0f} MiB (bound {bound:.0f})" if extra is not None and bound else "",
            _why(res, "fsmtl-auto", "floor") or "no peak memory",
        ),
    ]
    if num_tasks == 8:
        partial = _ratio(res, "partial-top2", "dense")
        forward = _ratio(res, "mask-forward", "mask-forward-loop")
        goals += [
            check(
                "step",
                f"{where} {STEP_GOALS_T8[0]}",
                partial,
                partial is not None and partial <= PARTIAL_DENSE,
                f"{partial:.2f}x" if partial else "",
                _why(res, "partial-top2", "dense"),
            ),
            check(
                "step",
                f"{where} {STEP_GOALS_T8[1]}",
                forward,
                forward is not None and forward <= MASK_FORWARD_LOOP,
                f"{forward:.2f}x" if forward else "",
                _why(res, "mask-forward", "mask-forward-loop"),
            ),
        ]
    return goals


def step_goals(step: list | None) -> list[Goal]:
    goals = []
    rows = {(r["model"], r["T"]): r["results"] for r in step or []}
    for model in ("mlp", "cnn"):
        for num_tasks in (2, 8, 40):
            where = f"{model} T={num_tasks}"
            res = rows.get((model, num_tasks))
            if res is not None:
                goals += step_row_goals(where, res, num_tasks)
                continue
            why = "no step table" if step is None else f"no row {where}"
            names = STEP_GOALS + (STEP_GOALS_T8 if num_tasks == 8 else ())
            goals += [check("step", f"{where} {g}", None, None, "", why) for g in names]
    return goals


def step_rows_from_log(text: str | None) -> list | None:
    """The step table's rows from its printed progress (``mlp 8 64 {...}``, one line per trunk
    and T): what it measured before a time limit stopped it, when its JSON was not written."""
    rows = []
    for line in (text or "").splitlines():
        match = re.match(r"^(\w+) (\d+) (\d+) (\{.*\})$", line.strip())
        if match:
            model, num_tasks, batch, results = match.groups()
            rows.append({"model": model, "T": int(num_tasks), "batch": int(batch), "results": json.loads(results)})
    return rows or None


def test_counts(text: str | None) -> dict[str, int] | None:
    """The counts of pytest's last summary line (``97 passed, 3 skipped, 551 deselected in 57s``)."""
    if not text:
        return None
    lines = [line for line in text.splitlines() if re.search(r"\b(passed|failed|error|errors|no tests ran)\b", line)]
    if not lines:
        return None
    return {word.rstrip("s"): int(n) for n, word in re.findall(r"(\d+) (passed|failed|errors?|skipped)", lines[-1])}


def tests_goal(text: str | None) -> Goal:
    counts = test_counts(text)
    if counts is None:
        return check("tests", "GPU tests (pytest -m gpu) pass", None, None, "", "no pytest summary line")
    bad = counts.get("failed", 0) + counts.get("error", 0)
    shown = ", ".join(f"{n} {w}" for w, n in counts.items())
    return check("tests", "GPU tests (pytest -m gpu) pass", float(bad), bad == 0 and counts.get("passed", 0) > 0, shown)


def evaluate(
    bandwidth: dict | None, step: list | None, tests: str | None, elapsed: float | None, budget: float
) -> list[Goal]:
    """Every goal from the check's outputs (None where a part wrote nothing)."""
    rows = rows_by_kernel(bandwidth)
    goals = [tests_goal(tests), *topk_goals(rows), *bandwidth_goals(rows), linear_goal(rows), *step_goals(step)]
    within = elapsed is not None and elapsed <= budget
    shown = f"{elapsed:.0f} s" if elapsed is not None else ""
    goals.append(check("check", f"within its budget ({budget:.0f} s)", elapsed, within, shown, "no elapsed time"))
    return goals


def render(goals: list[Goal], header: str) -> str:
    width = max(len(g.goal) for g in goals) + max(len(g.group) for g in goals) + 2
    lines = [header, ""]
    for g in goals:
        lines.append(f"{g.status.upper():>10}  {(g.group + ': ' + g.goal):<{width}}  {g.measured}")
    counts = {s: sum(g.status == s for g in goals) for s in ("met", "missed", "unmeasured")}
    lines += ["", f"{counts['met']} met, {counts['missed']} missed, {counts['unmeasured']} unmeasured"]
    return "\n".join(lines)


def _read_json(path: Path | None):
    if path is None or not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        print(f"WARNING: {path} is not valid JSON ({exc}); its goals are unmeasured", file=sys.stderr)
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bandwidth", type=Path, help="JSON of gpu_bandwidth.py --check")
    parser.add_argument("--step", type=Path, help="JSON of step_table.py --device cuda --out")
    parser.add_argument("--step-log", type=Path, help="its printed output: the rows it finished, if no JSON")
    parser.add_argument("--tests", type=Path, help="log of pytest -m gpu")
    parser.add_argument("--elapsed", type=float, help="seconds the check took so far")
    parser.add_argument("--budget", type=float, default=390.0, help="the check's time budget in seconds")
    parser.add_argument("--failed", default="", help="parts of the check that failed or timed out (space-separated)")
    parser.add_argument("--label", default="", help="a line naming the run (machine, date)")
    parser.add_argument("--json", type=Path, help="where to write the summary")
    args = parser.parse_args(argv)

    bandwidth = _read_json(args.bandwidth)
    step = _read_json(args.step)
    if step is None and args.step_log and args.step_log.exists():
        step = step_rows_from_log(args.step_log.read_text(errors="replace"))
    tests = args.tests.read_text(errors="replace") if args.tests and args.tests.exists() else None
    goals = evaluate(bandwidth, step, tests, args.elapsed, args.budget)
    machine = (bandwidth or {}).get("device", "unknown device")
    header = f"GPU check summary: {args.label or machine}"
    print(render(goals, header))
    failed = args.failed.split()
    tests_ok = goals[0].status == "met"
    if failed:
        print(f"\nFAILED parts of the check: {' '.join(failed)} (their goals are unmeasured or stale)")
    if not tests_ok:
        print(f"\nFAILED: the GPU tests did not all pass ({goals[0].measured})")
    if args.json:
        summary = {
            "label": args.label,
            "device": machine,
            "failed_parts": failed,
            "goals": [asdict(g) for g in goals],
        }
        args.json.write_text(json.dumps(summary, indent=1))
    return 1 if failed or not tests_ok else 0


if __name__ == "__main__":
    sys.exit(main())
