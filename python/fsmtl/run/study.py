"""``fsmtl study SPEC.json --out DIR``: a declared grid of experiments, resumable, with a Markdown report.

A spec is a JSON object::

    {
      "name": "where-fs-helps",
      "description": "one paragraph, copied into the report",
      "seeds": [0, 1, 2],                  # reported seeds
      "select_seeds": [100, 101],          # choose the keep ratio on validation (several ratios)
      "settings": {"epochs": 20},          # ExperimentConfig fields shared by every setting
      "grid": [                            # each entry: the product of its list-valued axes
        {"benchmark": "synthetic",
         "benchmark_options": {"relatedness": [0.0, 0.6]},   # lists: one setting per value
         "hidden": [128, 512],                               # ExperimentConfig fields, lists too
         "methods": ["stl", "mtl", "rs", "fs", "stl-fs"],
         "keep_ratios": [0.1, 0.5],
         "curve": true}                    # also report every keep ratio on the reported seeds
      ]
    }

A *setting* is one benchmark with one value of every axis. In each setting every method follows the
evaluation protocol of ``fsmtl run`` (:mod:`fsmtl.run.protocol`: keep ratio chosen on validation
with ``select_seeds``, test reported on ``seeds``); with ``curve`` every keep ratio is also
reported on the reported seeds (the paper's Fig. 4). A *cell* is one training run (setting, method, keep ratio,
seed); each finished cell is written atomically to ``DIR/cells/<id>.json`` and skipped when the study
runs again, so an interrupted study continues where it stopped. ``DIR/report.md`` holds the tables,
paired tests and figures.
"""

from __future__ import annotations

import datetime
import hashlib
import itertools
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, fields
from functools import partial
from pathlib import Path

from ..data import load_benchmark
from ..engine import checkpoint as ckpt
from ..strategies import get_method
from ..tasks import task_kind
from ..tasks.metrics import METRIC_DIRECTION
from .experiment import ExperimentConfig, train_once
from .info import machine
from .protocol import check_seed_split, run_protocol, score_record
from .report import method_label
from .stats import format_p, holm_family, paired_tests, sample_std
from .units import format_unit_table

CONFIG_FIELDS = {f.name for f in fields(ExperimentConfig)}
GRID_KEYS = CONFIG_FIELDS | {"curve"}
PROTOCOL_KEYS = {"seeds", "select_seeds", "methods", "keep_ratios"}
#: Settings added after studies were recorded, with the value that trains as before they existed:
#: at that value they stay out of a cell's identity, so the recorded cells keep their names.
ADDED_SETTINGS = {"lr_schedule": None}


def load_spec(path) -> dict:
    """Read and check a study spec (see the module docstring)."""
    spec = json.loads(Path(path).read_text())
    if not isinstance(spec, dict) or not isinstance(spec.get("grid"), list) or not spec["grid"]:
        raise ValueError(f"{path}: a study spec is a JSON object with a non-empty 'grid' list")
    unknown = set(spec) - {"name", "description", "seeds", "select_seeds", "settings", "grid"}
    if unknown:
        raise ValueError(f"{path}: unknown spec keys {sorted(unknown)}")
    seeds, select = spec.get("seeds", [0, 1, 2]), spec.get("select_seeds", [100, 101])
    check_seed_split(seeds, select)
    bad = set(spec.get("settings", {})) - (CONFIG_FIELDS - PROTOCOL_KEYS)
    if bad:
        raise ValueError(f"{path}: 'settings' keys must be ExperimentConfig fields (not {sorted(PROTOCOL_KEYS)}): "
                         f"{sorted(bad)}")  # fmt: skip
    for i, entry in enumerate(spec["grid"]):
        bad = set(entry) - (GRID_KEYS - {"seeds", "select_seeds"})  # the seeds are the study's
        if bad:
            raise ValueError(f"{path}: grid[{i}] has unknown keys {sorted(bad)}")
        for m in entry.get("methods", ExperimentConfig.methods):
            get_method(m)
    return {"name": Path(path).stem, "description": "", "settings": {}, **spec, "seeds": seeds, "select_seeds": select}


def _axes(value) -> list:
    return value if isinstance(value, list) else [value]


def expand(spec: dict) -> list[dict]:
    """The settings of a spec: one dict per combination, with ``config`` (ExperimentConfig
    keyword arguments) and ``curve``."""
    out = []
    for entry in spec["grid"]:
        entry = dict(entry)
        curve = bool(entry.pop("curve", False))
        methods, ratios = entry.pop("methods", None), entry.pop("keep_ratios", None)
        options = entry.pop("benchmark_options", {})
        opt_keys = sorted(options)
        other_keys = sorted(entry)
        for opt_values in itertools.product(*(_axes(options[k]) for k in opt_keys)):
            for values in itertools.product(*(_axes(entry[k]) for k in other_keys)):
                config = {**spec["settings"], **dict(zip(other_keys, values))}
                config["benchmark_options"] = {**spec["settings"].get("benchmark_options", {}),
                                               **dict(zip(opt_keys, opt_values))}  # fmt: skip
                config["seeds"], config["select_seeds"] = tuple(spec["seeds"]), tuple(spec["select_seeds"])
                if methods is not None:
                    config["methods"] = tuple(methods)
                if ratios is not None:
                    config["keep_ratios"] = tuple(ratios)
                ExperimentConfig(**config)  # checked before anything trains
                out.append({"config": config, "curve": curve, "label": _setting_label(config)})
    return out


def _setting_label(config: dict) -> str:
    """The benchmark, then every option and setting the spec gives (defaults are not repeated)."""
    parts = [config.get("benchmark", ExperimentConfig.benchmark)]
    parts += [f"{k}={v}" for k, v in sorted(config["benchmark_options"].items())]
    parts += [f"{k}={config[k]}" for k in sorted(config) if k not in ("benchmark", "benchmark_options", *PROTOCOL_KEYS)]
    return ", ".join(parts)


def _cell_id(cfg: ExperimentConfig, method: str, keep_ratio: float, seed: int) -> str:
    """Every training setting of the run, resolved (so a changed default is a new cell), without
    the protocol's lists (methods, keep ratios, seeds): the same run is the same cell in every
    study that declares it."""
    key = {
        k: v
        for k, v in asdict(cfg).items()
        if k not in PROTOCOL_KEYS and not (k in ADDED_SETTINGS and v == ADDED_SETTINGS[k])
    }
    key = json.dumps({**key, "method": method, "keep_ratio": keep_ratio, "seed": seed}, sort_keys=True, default=str)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


class CellStore:
    """Finished cells under ``DIR/cells``: one JSON file per cell, written atomically."""

    def __init__(self, directory) -> None:
        self.directory = Path(directory) / "cells"
        self.directory.mkdir(parents=True, exist_ok=True)

    def get(self, cell: str) -> dict | None:
        path = self.directory / f"{cell}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def put(self, cell: str, record: dict) -> None:
        ckpt.atomic_write_text(json.dumps(record), self.directory / f"{cell}.json")


def _run_cell(store, bench, cfg, method, seed, p, role, *, log, used: list) -> dict:
    cell = _cell_id(cfg, method, p, seed)
    done = store.get(cell)
    if done is not None:
        used.append(done)
        return done
    started = time.perf_counter()
    run = train_once(bench, method, seed, p, cfg)
    host = machine(cfg.device)
    record = {
        **score_record(bench.tasks, method, seed, p, role, run),
        "test_per_task": run["test"],
        "seconds": time.perf_counter() - started,
        # The numbers are bit-reproducible on the same CPU with the same thread count (torch's
        # CPU kernels may split a reduction by thread), so each cell says where it was computed.
        "computed_on": {"cpu": host["cpu"], "torch_threads": host["torch_threads"], "device": host["device"]},
    }
    used.append(record)
    store.put(cell, record)
    log(f"  {method} p={p:g} seed {seed} ({role}): val {record['val_score']:.4f} ({record['seconds']:.0f} s)")
    return record


def _val_score(record: dict) -> float:
    return record["val_score"]


def run_study(spec: dict, out, *, log=print) -> dict:
    """Run every cell of ``spec`` not finished in ``out`` yet; returns the study's results (also
    written to ``out/study.json``) and writes ``out/report.md`` with its figures."""
    out = Path(out)
    store = CellStore(out)
    settings = expand(spec)
    started = time.perf_counter()
    results = []
    used: list[dict] = []  # the cell records this study reads or computes
    for i, setting in enumerate(settings):
        config = setting["config"]
        cfg = ExperimentConfig(**config)
        bench = load_benchmark(cfg.benchmark, **cfg.benchmark_options)
        log(f"setting {i + 1}/{len(settings)}: {setting['label']}")
        methods = {}
        for method in cfg.methods:
            cell = partial(_run_cell, store, bench, cfg, method, log=log, used=used)
            outcome = run_protocol(
                method, cfg.keep_ratios, cfg.select_seeds, cfg.seeds, cell, _val_score, curve=setting["curve"]
            )
            methods[method] = {
                "chosen": outcome.chosen,
                "val_scores": {str(p): v for p, v in outcome.val_scores.items()},
                "reported": outcome.reported,
            }
        results.append(_summarize_setting(setting, bench, methods))
    study = {
        "name": spec["name"],
        "description": spec.get("description", ""),
        "seeds": list(spec["seeds"]),
        "select_seeds": list(spec["select_seeds"]),
        "settings": results,
        "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "seconds_this_invocation": time.perf_counter() - started,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU(s), load average {os.getloadavg()[0]:.1f}",
        "computed_on": computed_on(used),
    }
    ckpt.atomic_write_text(json.dumps(study, indent=1, default=str), out / "study.json")
    figures = plot_study(study, out)
    ckpt.atomic_write_text(format_report(study, figures), out / "report.md")
    return study


def computed_on(records: list[dict]) -> list[str]:
    """Where the cells were computed: one line per (CPU, device, torch threads), with its count of
    cells (cells written before this was recorded count as "not recorded")."""
    places: dict[str, int] = {}
    for record in records:
        where = record.get("computed_on")
        label = (
            f"{where['cpu']}, {where['device']}, {where['torch_threads']} torch thread(s)"
            if where is not None
            else "not recorded"
        )
        places[label] = places.get(label, 0) + 1
    return [f"{label}: {n} cell(s)" for label, n in places.items()]


def _metric_info(bench) -> tuple[str, bool]:
    """The shared primary metric of the tasks (its name and direction), or the signed score."""
    names = {task_kind(t.kind).primary_metric for t in bench.tasks}
    if len(names) == 1:
        name = names.pop()
        return name, METRIC_DIRECTION[name]
    return "score", True


def _summarize_setting(setting: dict, bench, methods: dict) -> dict:
    metric, higher = _metric_info(bench)

    def shown(score: float) -> float:  # the primary metric itself (scores are signed: higher better)
        return score if higher or metric == "score" else -score

    rows = {}
    for method, m in methods.items():
        for p, runs in m["reported"].items():
            scores = [r["test_score"] for r in runs]
            per_task = [
                {
                    "mean": statistics.mean(shown_task(r, t, bench) for r in runs),
                    "std": sample_std([shown_task(r, t, bench) for r in runs]),
                }
                for t in range(len(bench.tasks))
            ]
            rows[f"{method}@{p:g}"] = {
                "method": method,
                "keep_ratio": p if get_method(method).sparse else None,
                "chosen": p == m["chosen"],
                "scores": scores,
                "mean": shown(statistics.mean(scores)),
                "std": sample_std(scores),
                "per_task": per_task,
                "seconds": sum(r["seconds"] for r in runs),
            }
    for row in rows.values():
        row["paired"] = {}
        for ref in ("mtl", "fs", "stl"):
            if ref not in methods or ref == row["method"]:
                continue
            same_p = f"{ref}@{row['keep_ratio']:g}" if row["keep_ratio"] is not None else None
            ref_key = same_p if same_p in rows and not row["chosen"] else f"{ref}@{methods[ref]['chosen']:g}"
            if ref_key in rows:
                row["paired"][f"vs_{ref}"] = {
                    "against": ref_key,
                    **paired_tests(row["scores"], rows[ref_key]["scores"]),
                }
    _holm_over_rows(rows)
    return {
        "label": setting["label"],
        "config": setting["config"],
        "curve": setting["curve"],
        "tasks": [t.name for t in bench.tasks],
        "metric": metric,
        "higher_is_better": higher,
        "methods": {m: {"chosen": v["chosen"], "val_scores": v["val_scores"]} for m, v in methods.items()},
        "rows": rows,
        **_unit_columns(bench, methods),
    }


def _holm_over_rows(rows: dict) -> None:
    """Holm-corrected p-values (``p_holm``) over the setting's distinct comparisons (row A against
    reference B and row B against A are one comparison), added to every paired test."""
    family: dict[frozenset, list[dict]] = {}
    for key, row in rows.items():
        for test in row["paired"].values():
            family.setdefault(frozenset((key, test["against"])), []).append(test)
    holm_family([tests[0] for tests in family.values()])
    for tests in family.values():
        for test in tests[1:]:
            for kind in ("ttest", "wilcoxon"):
                test[kind]["p_holm"] = tests[0][kind]["p_holm"]


def _unit_columns(bench, methods: dict) -> dict:
    """For tasks that record their scale (QM9): per method at its chosen keep ratio, the test MAE
    per target in published units, Delta M% against STL and the mean rank (:mod:`fsmtl.run.units`)."""
    from .units import task_scales, unit_summary

    tasks = [asdict(t) for t in bench.tasks]
    scales = task_scales(tasks)
    if scales is None:
        return {}
    runs = {m: [r["test_per_task"] for r in v["reported"][v["chosen"]]] for m, v in methods.items()}
    ranked = [m for m in runs if not get_method(m).single_task]
    summary = unit_summary(runs, scales, reference="stl" if "stl" in runs else None, ranked=ranked)
    return {"units": summary, "task_units": [t.get("unit", "") for t in tasks]}


def shown_task(record: dict, t: int, bench) -> float:
    name = task_kind(bench.tasks[t].kind).primary_metric
    return record["test_per_task"][t][name]


def format_report(study: dict, figures: dict) -> str:
    """The study as Markdown: protocol, then per setting the reported table with paired tests,
    the keep-ratio curve table and the figures."""
    seeds = ", ".join(map(str, study["seeds"]))
    lines = [
        f"# Study `{study['name']}`",
        "",
        study["description"],
        "",
        f"Protocol: keep ratios chosen on validation with selection seeds {', '.join(map(str, study['select_seeds']))} "
        f"(mean validation score), test scores reported on seeds {seeds}; mean +- sample std (ddof=1) over the "
        "reported seeds; paired two-sided tests over the reported seeds of the per-seed score (mean primary metric "
        "over tasks): p of the t-test / p of the Wilcoxon signed-rank test, and the seeds on which the row is better. "
        "In brackets: the same p-values with Holm's correction over the setting's distinct comparisons. "
        "`n/a`: the test is undefined (reason in study.json). Rows marked `*` use the keep ratio chosen on "
        "validation; unmarked rows are fixed keep ratios (compared with the reference at the same keep ratio).",
        "",
        f"Finished {study['finished_at']} on {study['machine']}.",
        "",
    ]
    if study.get("computed_on"):  # studies written before cells recorded it have none
        lines += ["Cells computed on: " + "; ".join(study["computed_on"]) + ".", ""]
    for i, s in enumerate(study["settings"]):
        arrow = "lower is better" if not s["higher_is_better"] else "higher is better"
        lines += [f"## {i + 1}. {s['label']}", "", f"Test {s['metric']} ({arrow}), mean over tasks.", ""]
        refs = [r for r in ("mtl", "fs", "stl") if r in s["methods"]]
        header = [
            "method",
            "p",
            f"{s['metric']} mean +- std",
            *[f"vs {method_label(r)}: diff, better, p t / W" for r in refs],
        ]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in sorted(s["rows"].values(), key=lambda r: (not r["chosen"], list(s["methods"]).index(r["method"]))):
            p = "-" if row["keep_ratio"] is None else f"{row['keep_ratio']:g}" + ("*" if row["chosen"] else "")
            std = "n/a" if row["std"] is None else f"{row['std']:.4f}"
            cells = [method_label(row["method"]), p, f"{row['mean']:.4f} +- {std}"]
            for r in refs:
                test = row["paired"].get(f"vs_{r}")
                if test is None:
                    cells.append("")
                    continue
                diff = test["mean_diff"] if s["higher_is_better"] or s["metric"] == "score" else -test["mean_diff"]
                holm = f"[{format_p(test['ttest'], 'p_holm')} / {format_p(test['wilcoxon'], 'p_holm')}]"
                cells.append(f"{diff:+.4f}, {test['wins']}/{test['n']}, "
                             f"{format_p(test['ttest'])} / {format_p(test['wilcoxon'])} {holm}")  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        if s.get("units"):
            tasks = [{"name": n, "unit": u} for n, u in zip(s["tasks"], s["task_units"])]
            lines += [
                "Test MAE per target in published units (mean ± std over the reported seeds), ΔM% against our STL "
                "(mean relative MAE change over the targets, per seed; lower is better), mean rank over the targets "
                "(STL not ranked):",
                "",
                *format_unit_table(s["units"], tasks, {m: method_label(m) for m in s["units"]}),
                "",
            ]
        for name in figures.get(i, []):
            lines += [f"![{name}]({name})", ""]
    return "\n".join(lines)


def plot_study(study: dict, out: Path) -> dict:
    """Per setting: the keep-ratio curve of the sparse methods with error bars and MTL as a line
    (Fig. 4), when the setting has a curve; per-task results with error bars (Figs. 2-3)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    figures = {}
    seeds = ",".join(map(str, study["seeds"]))
    for i, s in enumerate(study["settings"]):
        names = []
        rows = s["rows"]
        sparse = [m for m in s["methods"] if get_method(m).sparse]
        if s["curve"] and sparse:
            fig, ax = plt.subplots(figsize=(6, 4))
            for m in sparse:
                pts = sorted((r["keep_ratio"], r["mean"], r["std"] or 0.0) for r in rows.values() if r["method"] == m)
                xs, ys, es = zip(*pts)
                ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=method_label(m))
            for ref, style in (("mtl", "--"), ("stl", ":")):
                row = rows.get(f"{ref}@1")
                if row is not None:
                    line = ax.axhline(row["mean"], linestyle=style, color="k" if ref == "mtl" else "gray",
                                      label=method_label(ref))  # fmt: skip
                    if row["std"]:
                        ax.axhspan(row["mean"] - row["std"], row["mean"] + row["std"], color=line.get_color(),
                                   alpha=0.1)  # fmt: skip
            direction = "higher" if s["higher_is_better"] else "lower"
            ax.set_xlabel("keep ratio p")
            ax.set_ylabel(f"test {s['metric']} ({direction} is better)")
            ax.set_title(f"{s['label']}\nmean +- std over seeds {seeds}", fontsize="small")
            ax.legend(fontsize="small")
            fig.tight_layout()
            names.append(f"curve_{i + 1}.png")
            fig.savefig(out / names[-1], dpi=110)
            plt.close(fig)
        chosen = [r for r in rows.values() if r["chosen"]]
        fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(s["tasks"]) * len(chosen) / 2), 4))
        width = 0.8 / max(len(chosen), 1)
        x = np.arange(len(s["tasks"]))
        for j, r in enumerate(chosen):
            means = [t["mean"] for t in r["per_task"]]
            errs = [np.nan if t["std"] is None else t["std"] for t in r["per_task"]]
            label = method_label(r["method"]) + ("" if r["keep_ratio"] is None else f" (p={r['keep_ratio']:g})")
            ax.bar(x + j * width, means, width, yerr=errs, capsize=2, label=label)
        ax.set_xticks(x + width * (len(chosen) - 1) / 2, s["tasks"], rotation=30, ha="right")
        ax.set_ylabel(f"test {s['metric']}")
        ax.set_title(f"{s['label']}\nper task, mean +- std over seeds {seeds}", fontsize="small")
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
        fig.tight_layout()
        names.append(f"per_task_{i + 1}.png")
        fig.savefig(out / names[-1], dpi=110)
        plt.close(fig)
        if s.get("units"):
            names.append(_plot_relative_mae(s, i, out, seeds))
        figures[i] = names
    return figures


def _plot_relative_mae(s: dict, i: int, out: Path, seeds: str) -> str:
    """Test MAE per target relative to STL's (or the first method's), one bar per method, log axis."""
    import matplotlib.pyplot as plt
    import numpy as np

    units = s["units"]
    reference = "stl" if "stl" in units else next(iter(units))
    base = np.array(units[reference]["mae"])
    fig, ax = plt.subplots(figsize=(max(6, 0.3 * len(s["tasks"]) * len(units)), 4))
    width = 0.8 / len(units)
    x = np.arange(len(s["tasks"]))
    for j, (m, row) in enumerate(units.items()):
        ax.bar(x + j * width, np.array(row["mae"]) / base, width, label=method_label(m))
    ax.axhline(1.0, color="k", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xticks(x + width * (len(units) - 1) / 2, s["tasks"], rotation=30, ha="right")
    ax.set_ylabel(f"test MAE / {method_label(reference)}'s (lower is better)")
    ax.set_title(f"{s['label']}\nMAE per target relative to {method_label(reference)}, mean over seeds {seeds}",
                 fontsize="small")  # fmt: skip
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    name = f"relative_mae_{i + 1}.png"
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name
