"""One comparison on one benchmark (``fsmtl run``): its settings (:class:`ExperimentConfig`), one
training run of a method with a seed (:func:`train_once`), and every method under the evaluation
protocol with the summary that ``results.json`` holds (:func:`run_experiment`)."""

from __future__ import annotations

import datetime
import statistics
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import partial

import torch

import fsmtl_kernels as fk

from ..collectives import run_record, world_size
from ..data import Benchmark, Split, load_benchmark
from ..engine import Trainer
from ..engine import checkpoint as ckpt
from ..model import count_nonzero_shared
from ..models import BACKBONES, build_model
from ..strategies import MaskSchedule, Method, MethodOptions, get_method
from ..tasks import average_metrics, average_rank, primary_score
from .fingerprint import run_fingerprint
from .info import environment
from .preflight import check_methods
from .protocol import check_seed_split, run_protocol, score_record
from .stats import paired_tests, sample_std


@dataclass
class ExperimentConfig:
    """Everything one comparison needs; the defaults are ``fsmtl run``'s."""

    benchmark: str = "digits-attributes"
    benchmark_options: dict = field(default_factory=dict)
    methods: Sequence[str] = ("stl", "mtl", "rs", "fs")
    seeds: Sequence[int] = (0, 1, 2)
    select_seeds: Sequence[int] = (100, 101)
    keep_ratios: Sequence[float] = (0.1, 0.5, 0.9)
    epochs: int = 20
    batch_size: int = 64
    lr: float = 1e-3
    hidden: int = 128
    warmup: int = 2
    update_every: int = 2
    samples: int = 256
    mask_forward: bool = False
    normalize: str = "tasks"
    device: str = "cpu"
    model: str = "auto"
    amp: str | None = None
    lr_schedule: str | None = None

    def __post_init__(self) -> None:
        check_methods(self.methods)  # known names, optional packages installed
        if self.model not in BACKBONES:
            raise ValueError(f"model must be one of {BACKBONES}, got {self.model!r}")
        if not self.seeds:
            raise ValueError("seeds must not be empty")
        if not self.keep_ratios:
            raise ValueError("keep_ratios must not be empty")
        check_seed_split(self.seeds, self.select_seeds)
        for i, p in enumerate(self.keep_ratios):
            fk.check_k(p, f"keep_ratios[{i}]")
        for name in ("epochs", "batch_size", "hidden", "samples", "update_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        if self.amp not in (None, "bf16", "fp16"):
            raise ValueError(f"amp must be None, 'bf16' or 'fp16', got {self.amp!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {tuple(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        try:
            torch.empty(0, device=self.device)
        except (RuntimeError, AssertionError) as exc:
            raise ValueError(f"device={self.device!r} is not usable here: {exc}") from None


LR_SCHEDULES = {
    None: "Adam at the constant --lr, the model after the last epoch",
    "plateau": "Nash-MTL's QM9 schedule: a validation every epoch, the learning rate times 0.7 after 5 epochs "
    "without a lower validation loss (down to 1e-5; torch's ReduceLROnPlateau), and the weights of the epoch "
    "with the best validation score at the end",
}
"""Learning-rate schedules of ``fsmtl run`` (``ExperimentConfig.lr_schedule``): name -> what it does."""


def build_lr_scheduler(name: str | None, optimizer: torch.optim.Optimizer):
    """The torch scheduler of ``LR_SCHEDULES[name]`` over ``optimizer`` (None for a constant rate)."""
    if name is None:
        return None
    return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=0.7, patience=5, min_lr=1e-5)


MIN_TEST_EXAMPLES = 50
"""Below this many test examples for a task, its metrics say little (one example moves accuracy by
2% or more); :func:`split_warnings` says so."""


def split_warnings(benchmark: Benchmark, minimum: int = MIN_TEST_EXAMPLES) -> list[str]:
    """One message per task whose test split is too small for its metrics to mean much."""
    messages = []
    for task, n in zip(benchmark.tasks, benchmark.test.sizes):
        if n < minimum:
            messages.append(
                f"task {task.name!r} of {benchmark.name!r} has only {n} test example(s) (< {minimum}): its test "
                "metrics and their std over seeds are not meaningful"
            )
    return messages


def method_options(keep_ratio: float, cfg: ExperimentConfig) -> MethodOptions:
    return MethodOptions(
        keep_ratio=keep_ratio,
        schedule=MaskSchedule(warmup=cfg.warmup, every=cfg.update_every),
        samples=cfg.samples,
        mask_forward=cfg.mask_forward,
        normalize=cfg.normalize,
    )


def _one_task(split: Split, t: int) -> Split:
    return Split([split.inputs[t]], [split.targets[t]])


def train_once(
    benchmark: Benchmark,
    method: str,
    seed: int,
    keep_ratio: float,
    cfg: ExperimentConfig,
    progress=None,
    store=None,
    parallel: str | None = None,
) -> dict:
    """Train one method with one seed; returns val and test metrics per task, history, mask info.
    With a :class:`fsmtl.run.resume.RunStore`, a finished run is read back and an interrupted one resumed."""
    spec = get_method(method)
    if not spec.single_task:
        return _train_model(benchmark, spec, seed, keep_ratio, cfg, progress, store, parallel)
    runs = []
    for t, task in enumerate(benchmark.tasks):
        sub = Benchmark(
            benchmark.name,
            [task],
            True,
            benchmark.input_shape,
            _one_task(benchmark.train, t),
            _one_task(benchmark.val, t),
            _one_task(benchmark.test, t),
        )
        runs.append(_train_model(sub, spec, seed, keep_ratio, cfg, progress, store, parallel))
    return {
        "val": [r["val"][0] for r in runs],
        "test": [r["test"][0] for r in runs],
        "history": [r["history"] for r in runs],
    }


def _train_model(
    benchmark: Benchmark,
    spec: Method,
    seed: int,
    keep_ratio: float,
    cfg: ExperimentConfig,
    progress,
    store=None,
    parallel: str | None = None,
) -> dict:
    # Each run seeds itself here, so a finished run read back below changes no other run.
    torch.manual_seed(seed)
    model = build_model(benchmark, hidden=cfg.hidden, backbone=cfg.model).to(cfg.device)
    strategy = spec.build(method_options(keep_ratio, cfg))
    amp = cfg.amp
    if parallel == "fsdp":  # sharded before the optimizer is built; mixed precision through FSDP2's policy
        model.shard(mp_policy=_mixed_precision(cfg.amp))
        amp = None
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    trainer = Trainer(
        model, benchmark.tasks, strategy, optimizer, homogeneous=benchmark.homogeneous, seed=seed, amp=amp,
        parallel=parallel, scheduler=build_lr_scheduler(cfg.lr_schedule, optimizer),
    )  # fmt: skip
    trainer.fingerprint.update(run_fingerprint(asdict(cfg)))  # its checkpoints and result name the run's settings
    run_dir = store.run_dir(spec.name, seed, keep_ratio, benchmark.tasks) if store is not None else None
    if run_dir is not None and (done := store.finished(run_dir, trainer.fingerprint)) is not None:
        return done
    # A schedule on validation losses also reports the best validation epoch's model (Nash-MTL's protocol).
    on_val = {"val": benchmark.val, "restore_best": True} if cfg.lr_schedule is not None else {}
    if store is not None:
        history = store.train(
            trainer, benchmark.train, epochs=cfg.epochs, batch_size=cfg.batch_size, run_dir=run_dir,
            progress=progress, **on_val,
        )  # fmt: skip
    else:
        history = trainer.fit(
            benchmark.train, epochs=cfg.epochs, batch_size=cfg.batch_size, progress=progress, **on_val
        )
    if progress is not None and hasattr(progress, "phase"):
        progress.phase("evaluation")
    result = {"val": trainer.evaluate(benchmark.val), "test": trainer.evaluate(benchmark.test), "history": history}
    mask = strategy.mask
    if mask is not None:
        result["mask"] = {
            "entries": mask.num_entries,
            "ones": mask.count().tolist(),
            "overlap": mask.overlap().tolist(),
        }
        if cfg.mask_forward:
            result["mask"]["inference_nonzero_shared"] = [
                count_nonzero_shared(model.export_task(t, strategy.forward_mask(t)))
                for t in range(len(benchmark.tasks))
            ]
    return store.finish(run_dir, result, trainer.fingerprint) if store is not None else result


def run_label(method: str, seed: int, keep_ratio: float) -> str:
    """How progress and interrupt messages name one run."""
    return f"{method} seed {seed}" + (f" p={keep_ratio:g}" if get_method(method).sparse else "")


def steps_per_run(benchmark: Benchmark, method: str, cfg: ExperimentConfig) -> int:
    sizes = benchmark.train.sizes
    batch = cfg.batch_size * world_size()  # several processes: a step takes one global batch
    if get_method(method).single_task:
        return sum(-(-n // batch) for n in sizes) * cfg.epochs
    return -(-max(sizes) // batch) * cfg.epochs


def _mixed_precision(amp: str | None):
    """FSDP2's mixed precision for ``--amp`` (None: float32)."""
    if amp is None:
        return None
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[amp])


def check_parallel(cfg: ExperimentConfig, benchmark: Benchmark, parallel: str | None) -> None:
    """``--parallel fsdp``: several processes, homogeneous tasks and methods that train on shards,
    checked before any run trains (one line each)."""
    if parallel is None:
        return
    if parallel != "fsdp":
        raise ValueError(f"--parallel must be fsdp, got {parallel!r}")
    if world_size() < 2:
        raise ValueError("--parallel fsdp shards over several processes: add --nproc N (or run under torchrun)")
    if not benchmark.homogeneous:
        raise ValueError(f"--parallel fsdp trains homogeneous tasks; benchmark {benchmark.name!r} is heterogeneous")
    for method in cfg.methods:
        reason = get_method(method).build(method_options(cfg.keep_ratios[0], cfg)).sharding_unsupported()
        if reason is not None:
            raise ValueError(f"--parallel fsdp: method {method!r}: {reason}")


def run_experiment(
    cfg: ExperimentConfig,
    *,
    benchmark: Benchmark | None = None,
    progress=None,
    store=None,
    parallel: str | None = None,
) -> dict:
    """Run every method of ``cfg`` under the evaluation protocol (:mod:`fsmtl.run.protocol`):
    the keep ratio chosen on validation with ``cfg.select_seeds``, the chosen one trained with
    every seed of ``cfg.seeds``, and its test metrics reported as mean and sample standard
    deviation, with paired tests (t-test, Wilcoxon) of the per-seed score against MTL and FS
    (:func:`fsmtl.run.stats.paired_tests`). ``methods[m]["runs"]`` keeps the validation and test
    score of every run, selection runs included. Returns a JSON-ready dict.

    ``progress``: a :class:`fsmtl.run.progress.Progress` (one bar per run). A stop request
    (SIGINT/SIGTERM under :func:`fsmtl.run.resume.stop_on_signals`) or a ``KeyboardInterrupt`` is
    re-raised with ``finished_runs`` (the runs done so far: method, seed, keep ratio, val and test
    metrics) and ``interrupted_run`` (the label of the run it stopped) attached; so is an ``OSError``
    (a checkpoint that could not be written). Every split of the benchmark is checked before the
    first run trains (:meth:`fsmtl.data.Benchmark.check`).
    """
    benchmark = benchmark if benchmark is not None else load_benchmark(cfg.benchmark, **cfg.benchmark_options)
    benchmark.check()  # every split of every task, before the first run trains
    check_parallel(cfg, benchmark, parallel)
    notes = split_warnings(benchmark)
    for note in notes:
        warnings.warn(note, UserWarning, stacklevel=2)
    started_at = datetime.datetime.now(datetime.timezone.utc)
    started = time.perf_counter()
    methods = {}
    finished_runs = []
    label = None
    records = []

    def train(method: str, seed: int, p: float, role: str) -> dict:
        nonlocal label
        label = run_label(method, seed, p)
        bar = progress.run(label, steps_per_run(benchmark, method, cfg)) if progress is not None else None
        try:
            run = train_once(benchmark, method, seed, p, cfg, bar, store, parallel)
        finally:
            if bar is not None:
                bar.close()
        finished_runs.append({"method": method, "seed": seed, "keep_ratio": p, "val": run["val"], "test": run["test"]})
        records.append(score_record(benchmark.tasks, method, seed, p, role, run))
        return run

    def val_score(run: dict) -> float:
        return primary_score(benchmark.tasks, run["val"])

    try:
        for method in cfg.methods:
            outcome = run_protocol(
                method, cfg.keep_ratios, cfg.select_seeds, cfg.seeds, partial(train, method), val_score
            )
            best = outcome.chosen
            methods[method] = _summarize(method, best, outcome.val_scores, outcome.reported[best], benchmark)
            methods[method]["runs"] = [r for r in records if r["method"] == method]
    except (ckpt.TrainingInterrupted, KeyboardInterrupt, OSError) as stop:
        stop.finished_runs = finished_runs
        stop.interrupted_run = label
        raise
    # As in the paper, single-task models are a reference, not ranked among the multi-task methods.
    ranked = {m: r["test_mean"] for m, r in methods.items() if not get_method(m).single_task}
    ranks = average_rank(ranked) if len(ranked) > 1 else {m: 1.0 for m in ranked}
    for m, r in methods.items():
        r["avg_rank"] = ranks.get(m)
        r["paired"] = {
            f"vs_{ref}": paired_tests(r["test_score_per_seed"], methods[ref]["test_score_per_seed"])
            for ref in ("mtl", "fs")
            if ref in methods and ref != m
        }
    return {
        "config": asdict(cfg),
        "benchmark": {
            "name": benchmark.name,
            "tasks": [asdict(t) for t in benchmark.tasks],
            "homogeneous": benchmark.homogeneous,
            "sizes": {s: getattr(benchmark, s).sizes for s in ("train", "val", "test")},
        },
        "methods": methods,
        "protocol": {
            "select_seeds": list(cfg.select_seeds),
            "seeds": list(cfg.seeds),
            "selection": "keep ratio with the best mean validation score over select_seeds (test scores unused)",
            "score": "mean over tasks of each task's primary metric, signed so that higher is better",
            "std": "sample standard deviation (ddof=1) over the reported seeds",
            "paired_tests": "two-sided scipy.stats.ttest_rel and wilcoxon of the per-seed score over the reported "
            "seeds, against MTL and FS",
        },
        "warnings": notes,
        "started_at": started_at.isoformat(timespec="seconds"),
        "ended_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "environment": environment(cfg.device),
        "seconds": time.perf_counter() - started,
        "fingerprint": run_fingerprint(asdict(cfg)),
        **run_record(),  # several processes: world_size and backend
        **({"parallel": parallel} if parallel is not None else {}),
    }


def _summarize(method: str, best: float, val_scores: dict, runs: list[dict], benchmark: Benchmark) -> dict:
    """The reported runs of one method (one per reported seed, at the chosen keep ratio)."""
    sparse = get_method(method).sparse
    per_seed = [average_metrics(r["test"]) for r in runs]
    names = list(per_seed[0])
    mean = {n: statistics.mean(s[n] for s in per_seed) for n in names}
    std = {n: sample_std([s[n] for s in per_seed]) for n in names}
    per_task = [
        {n: statistics.mean(r["test"][t][n] for r in runs) for n in runs[0]["test"][t]}
        for t in range(len(benchmark.tasks))
    ]
    per_task_std = [
        {n: sample_std([r["test"][t][n] for r in runs]) for n in runs[0]["test"][t]}
        for t in range(len(benchmark.tasks))
    ]
    scores = [primary_score(benchmark.tasks, r["test"]) for r in runs]
    out = {
        "keep_ratio": best if sparse else None,
        "val_scores": {str(p): v for p, v in val_scores.items()},
        "test_mean": mean,
        "test_std": std,
        "test_score_mean": statistics.mean(scores),
        "test_score_std": sample_std(scores),
        "test_score_per_seed": scores,
        "test_per_task": per_task,
        "test_per_task_std": per_task_std,
        "test_per_seed": per_seed,
        "test_per_seed_per_task": [r["test"] for r in runs],
        "mask_updates": [_mask_updates(r["history"]) for r in runs] if sparse else [],
        # False when the warm-up covered the whole run: the "sparse" rows are then plain MTL.
        "mask_used": any(_mask_updates(r["history"]) for r in runs) if sparse else None,
    }
    if sparse:
        out["mask"] = _mask_summary([r.get("mask") for r in runs], best)
    return out


def _mask_updates(history) -> list:
    """A run's mask updates; a single-task method's run (one history per task): those of each task
    (empty when no task had one)."""
    if isinstance(history, dict):
        return history["mask_updates"]
    per_task = [h["mask_updates"] for h in history]
    return per_task if any(per_task) else []


def random_mask_overlap(keep_ratio: float) -> float:
    """Expected Jaccard index of two independent uniformly random masks each keeping a share p of
    the entries (many entries): |A n B| ~ p^2 P, |A u B| ~ (2p - p^2) P, so p / (2 - p)."""
    return keep_ratio / (2.0 - keep_ratio)


def _mask_summary(masks: list, keep_ratio: float) -> dict | None:
    """The final masks of a sparse method's runs (one per seed): task-by-task overlap averaged over
    the seeds (with its std and the overlap random masks would have), sizes of the first seed."""
    masks = [m for m in masks if m is not None]
    if not masks:
        return None
    overlaps = torch.tensor([m["overlap"] for m in masks], dtype=torch.float64)
    out = dict(masks[0])
    out["overlap"] = overlaps.mean(0).tolist()
    # Sample std (ddof=1), as every other spread this package reports; undefined for one seed.
    out["overlap_std"] = overlaps.std(0).tolist() if len(masks) > 1 else None
    out["overlap_seeds"] = len(masks)
    out["random_overlap"] = random_mask_overlap(keep_ratio) if isinstance(keep_ratio, float) else None
    return out
