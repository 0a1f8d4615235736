"""The ``fsmtl`` command: ``fsmtl run`` reproduces the paper's comparison on a benchmark;
``fsmtl benchmarks`` lists the benchmarks and their options; ``fsmtl info`` describes the install.

Everything ``fsmtl run`` can check before training (names, ``-o`` values, the methods' packages,
the output directory and its lock, every split of the benchmark, a resumed run's fingerprint) is
checked first: a misuse ends with one ``fsmtl: error: ...`` line and exit code 2 before anything
trains. SIGINT/SIGTERM stop after the current step, the finished runs' results are written, and
the command exits with code 130; a file that cannot be written ends in one line naming it, with
the finished runs kept, and exit code 1 (see :func:`run_command`).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import warnings
from dataclasses import fields
from pathlib import Path

from .launcher import run_cli


def _csv(kind):
    def parse(text: str):
        try:
            values = [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated list of {kind.__name__}, got {text!r}"
            ) from None
        if not values:
            raise argparse.ArgumentTypeError("expected at least one value")
        return values

    return parse


def _option(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _version() -> str:
    from .info import package_version

    return f"fsmtl (fsmtl-kernels) {package_version('fsmtl-kernels') or 'unknown version'}"


def add_run_arguments(run: argparse.ArgumentParser, *, defaults: bool = True) -> None:
    """The options of ``fsmtl run`` on ``run``; ``defaults=False`` gives every option the default
    ``argparse.SUPPRESS``, so that a parse shows which options the command line gave."""
    import fsmtl_kernels as fk

    from ..data import BENCHMARKS
    from ..models import BACKBONES
    from ..strategies import ARCHITECTURES, METHODS, WEIGHTINGS
    from .experiment import LR_SCHEDULES, ExperimentConfig
    from .presets import PRESETS

    d = ExperimentConfig()

    def D(value):  # noqa: N802 (reads as the default it stands for)
        return value if defaults else argparse.SUPPRESS

    bench_help = ", ".join(BENCHMARKS) + "; fsmtl benchmarks lists them with their options"
    run.add_argument("--benchmark", default=D(d.benchmark), help=f"benchmark name: {bench_help}")
    run.add_argument(
        "--option",
        "-o",
        type=_option,
        action="append",
        default=D([]),
        metavar="KEY=VALUE",
        help="benchmark option or data path, typed and checked against the benchmark's options (fsmtl "
        "benchmarks lists them), e.g. -o relatedness=0.2 or -o mnist_dir=/data/mnist; repeatable",
    )
    run.add_argument(
        "--methods",
        type=_csv(str),
        default=D(",".join(d.methods)),
        help=f"comma-separated methods, any of: {', '.join(METHODS)}; or ARCH+WEIGHTING (e.g. tr+gradnorm) with "
        f"ARCH one of {', '.join(ARCHITECTURES)} and WEIGHTING one of {', '.join(WEIGHTINGS)}",
    )
    run.add_argument(
        "--seeds",
        type=_csv(int),
        default=D(",".join(map(str, d.seeds))),
        help="comma-separated seeds (model initialisation, batch order, mask sampling; the data split is fixed) "
        "whose test scores are reported, at the keep ratio chosen with --select-seeds",
    )
    run.add_argument(
        "--select-seeds",
        type=_csv(int),
        default=D(",".join(map(str, d.select_seeds))),
        help="comma-separated seeds that choose the keep ratio on validation (needed only with several keep "
        "ratios); never reported, and disjoint from --seeds",
    )
    run.add_argument(
        "--keep-ratios",
        type=_csv(float),
        default=D(",".join(f"{p:g}" for p in d.keep_ratios)),
        help="comma-separated grid of keep ratios p in (0, 1] for the sparse methods, the best chosen on validation",
    )
    run.add_argument("--epochs", type=int, default=D(d.epochs), help="training epochs per run")
    run.add_argument("--batch-size", type=int, default=D(d.batch_size), help="examples per task per step")
    run.add_argument("--lr", type=float, default=D(d.lr), help="Adam learning rate")
    run.add_argument("--hidden", type=int, default=D(d.hidden), help="trunk width")
    run.add_argument("--warmup", type=int, default=D(d.warmup), help="dense warm-up epochs before the first mask")
    run.add_argument("--update-every", type=int, default=D(d.update_every), help="epochs between mask updates")
    run.add_argument("--samples", type=int, default=D(d.samples), help="examples per task for each Fisher estimate")
    run.add_argument(
        "--mask-forward", action="store_true", default=D(False), help="run each task's forward on S_t * theta (Eq. 3)"
    )
    run.add_argument(
        "--normalize",
        choices=fk.NORMALIZE_MODES,
        default=D(d.normalize),
        help="divide the masked sum by T, or by the number of tasks selecting each entry",
    )
    run.add_argument("--device", default=D(d.device), help="torch device, e.g. cpu or cuda")
    run.add_argument(
        "--model",
        choices=BACKBONES,
        default=D(d.model),
        help="trunk: auto (MLP, small CNN or dense CNN by the input) or one by name: "
        + ", ".join(b for b in BACKBONES if b != "auto")
        + " (resnet18, segnet: the paper's backbones; see fsmtl.models)",
    )
    run.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=D(None),
        help="the paper's settings for a benchmark (model, batch, optimiser, epochs; sources in fsmtl.run.presets); "
        "add the data paths with -o; options given here win",
    )
    run.add_argument(
        "--out",
        type=Path,
        default=D(Path("fsmtl-results")),
        help="output folder (created if missing; one holding another run's results is refused unless --overwrite)",
    )
    run.add_argument(
        "--overwrite",
        action="store_true",
        default=D(False),
        help="replace the results of an earlier run in --out (its results, table and figures are deleted first)",
    )
    run.add_argument(
        "--no-progress",
        action="store_true",
        default=D(False),
        help="hide the progress (by default one bar per run on a terminal, plain lines in a log file)",
    )
    run.add_argument("--amp", choices=("bf16", "fp16"), default=D(None), help="mixed precision of the forward pass")
    run.add_argument(
        "--lr-schedule",
        choices=[name for name in LR_SCHEDULES if name is not None],
        default=D(None),
        help="plateau: " + LR_SCHEDULES["plateau"] + " (default: a constant learning rate)",
    )
    run.add_argument(
        "--nproc",
        type=int,
        default=D(1),
        help="train on this many local processes (torch.distributed, gloo on CPU, NCCL on CUDA; the same as "
        "torchrun --standalone --nproc_per_node N -m fsmtl run ...); --batch-size is per process",
    )
    run.add_argument(
        "--parallel",
        choices=("fsdp",),
        default=D(None),
        help="with several processes: fsdp shards the model's parameters, gradients and optimizer state over "
        "them with FSDP2 (homogeneous tasks, methods that train on shards; see docs/sharded.md); by default every "
        "process holds the whole model and one all-reduce combines the gradients",
    )
    run.add_argument(
        "--checkpoint-dir",
        type=Path,
        default=D(None),
        help="write resumable checkpoints and each finished run's result to this folder",
    )
    run.add_argument("--checkpoint-every", type=int, default=D(1), help="epochs between checkpoints (--checkpoint-dir)")
    run.add_argument(
        "--resume",
        type=Path,
        default=D(None),
        metavar="DIR",
        help="continue the run checkpointed in DIR (its settings)",
    )


def explicit_options(argv) -> set[str]:
    """The ``dest`` names of the ``fsmtl run`` options given on the command line ``argv``."""
    parser = argparse.ArgumentParser(prog="fsmtl", add_help=False)
    add_run_arguments(parser.add_subparsers(dest="command").add_parser("run", add_help=False), defaults=False)
    return set(vars(parser.parse_args(argv))) - {"command"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fsmtl", description="Fisher Sparse Multi-Task Learning (AAAI-24).")
    parser.add_argument("--version", action="version", version=_version(), help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run",
        help="train and compare methods on a benchmark",
        description="Train STL, MTL, RS and FS (by default) over several seeds, choose each sparse method's keep "
        "ratio on validation, and report test metrics as in the paper's Table 1. Writes results.json, "
        "results.csv, table.txt and figures to --out.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_run_arguments(run)
    sub.add_parser("benchmarks", help="list the benchmarks with their options, types and defaults")
    study = sub.add_parser(
        "study",
        help="run a declared grid of experiments (resumable) and write a Markdown report",
        description="Run the grid of a study spec (JSON; see fsmtl.run.study): every setting under the evaluation "
        "protocol, each finished run saved in OUT/cells and skipped when the study runs again; writes "
        "OUT/study.json, OUT/report.md and its figures.",
    )
    study.add_argument("spec", type=Path, help="the study spec, a JSON file (e.g. benchmarks/studies/*.json)")
    study.add_argument("--out", type=Path, required=True, help="output folder (the cells of earlier runs are reused)")
    sub.add_parser("info", help="print versions, backends, the C++ extension's build status and thread settings")
    return parser


def _resolve(args, held) -> tuple:
    """Settings, checkpoint store, loaded benchmark and the old output files to clear: every check
    that can run before training, in an order where a failure leaves nothing behind. ``--out`` and
    the checkpoint directory are locked (in ``held``, a :class:`fsmtl.run.outputs.Locks`) before
    anything is written to them."""
    from .experiment import ExperimentConfig
    from .preflight import check_benchmark, check_output, check_writable_dir, parse_options
    from .presets import resolve_settings
    from .resume import RUN_FILE, prepare, read_run_file

    # Every option but --option/--out/--no-progress/--overwrite is named like an ExperimentConfig field.
    settings = {f.name: getattr(args, f.name) for f in fields(ExperimentConfig) if hasattr(args, f.name)}
    given = explicit_options(args.argv)
    settings["benchmark_options"] = {}
    settings = resolve_settings(settings, given, args.preset)  # --preset, then the benchmark's run defaults
    benchmark = settings["benchmark"]
    if args.resume is not None and "benchmark" not in given and (args.resume / RUN_FILE).is_file():
        benchmark = read_run_file(args.resume).get("benchmark", benchmark)
    check_benchmark(benchmark)
    settings["benchmark_options"] = {**settings["benchmark_options"], **parse_options(benchmark, args.option)}
    if args.resume is None:
        ExperimentConfig(**settings)  # validate before the checkpoint directory is written
        check_writable_dir(args.out, "--out")
        _lock(held, args.out, "--out")
        check_output(args.out, overwrite=args.overwrite)
        if args.checkpoint_dir is not None:
            check_writable_dir(args.checkpoint_dir, "--checkpoint-dir")
            _lock(held, args.checkpoint_dir, "--checkpoint-dir")
    elif args.resume.is_dir():
        _lock(held, args.resume, "--checkpoint-dir")
    explicit = given if args.resume is not None else set()
    settings, store = prepare(args, settings, explicit)  # --resume: the saved settings; sets args.out
    if args.resume is not None:
        check_writable_dir(args.out, "--out")
        _lock(held, args.out, "--out")
    cfg = ExperimentConfig(**settings)
    from ..data import load_benchmark

    data = load_benchmark(cfg.benchmark, **cfg.benchmark_options)
    old = check_output(args.out, overwrite=args.overwrite, resume=args.resume is not None)
    return cfg, store, data, old


def _lock(held, directory: Path, flag: str) -> None:
    """Lock ``directory`` for this command (:class:`fsmtl.run.outputs.Locks`); rank 0 alone in a
    multi-process run (the others write into their own scratch folders)."""
    from ..collectives import is_main_process

    if is_main_process():
        held.lock(directory, flag)


def _partial(args, cfg, stop) -> dict:
    """The finished runs' metrics, the run that was stopped, settings, command and environment."""
    from .fingerprint import jsonable
    from .info import environment

    return {
        "interrupted": str(stop) or type(stop).__name__,
        "interrupted_run": getattr(stop, "interrupted_run", None),
        "finished_runs": getattr(stop, "finished_runs", []),
        "config": jsonable(vars(cfg)),
        "command": args.command_line,
        "environment": environment(cfg.device),
    }


def _write_partial(args, cfg, stop) -> Path:
    """``--out/partial-results.json``: see :func:`_partial`."""
    from ..engine.checkpoint import atomic_write_text
    from .preflight import PARTIAL_RESULTS

    return atomic_write_text(json.dumps(_partial(args, cfg, stop), indent=1), args.out / PARTIAL_RESULTS)


def _write_failed(args, cfg, store, exc: OSError, results: dict | None) -> int:
    """An ``OSError`` while writing (a checkpoint, a result, an output): keep what finished where
    it can be written, and say in one line which file failed, why, and where the runs are."""
    from .outputs import keep_finished
    from .preflight import PARTIAL_RESULTS

    target = exc.filename or "a file"
    cause = exc.strerror or str(exc) or type(exc).__name__
    payload = _partial(args, cfg, exc)
    payload["interrupted"] = f"cannot write {target}: {cause}"
    if results is not None:
        payload["results"] = results  # training finished: all of it, for the outputs that could not be written
        count = sum(len(m.get("runs", [])) for m in results["methods"].values())
    else:
        count = len(payload["finished_runs"])
    places = [args.out / PARTIAL_RESULTS]
    if store is not None:
        places.insert(0, store.directory / PARTIAL_RESULTS)
    kept = keep_finished(payload, places)
    where = (
        f"{count} finished run(s) kept in {kept}" if kept else f"{count} finished run(s) could not be written anywhere"
    )
    how = f"; continue with: fsmtl run --resume {store.directory}" if store is not None else ""
    print(f"fsmtl: error: cannot write {target}: {cause}; {where}{how}", file=sys.stderr)
    return 1


def _space_warnings(args, cfg, data, store, runs: int) -> None:
    """Warn when ``--out`` or the checkpoint directory has less free space than the run writes."""
    import torch

    from ..collectives import is_main_process
    from ..models import build_model
    from .outputs import expected_bytes, space_warnings

    if not is_main_process():
        return
    with torch.random.fork_rng(devices=[]):  # the estimate draws nothing from the runs' random streams
        parameters = sum(p.numel() for p in build_model(data, hidden=cfg.hidden, backbone=cfg.model).parameters())
    keep_last = store.keep_last if store is not None else 0
    need = expected_bytes(parameters, runs, len(cfg.methods) + 2, keep_last)
    needs = {args.out: ("--out", need["outputs"])}
    if store is not None:
        needs[store.directory] = ("--checkpoint-dir", need["checkpoints"])
    for message in space_warnings(needs):
        warnings.warn(message, UserWarning, stacklevel=2)


def run_command(args) -> int:
    """``fsmtl run``: checks, then the experiment, then the results in ``--out``.

    ``--out`` and ``--checkpoint-dir`` are locked for the whole command (a second command on them
    stops before training). On SIGINT/SIGTERM the current step finishes, the finished runs are
    written to ``--out/partial-results.json`` (and with ``--checkpoint-dir`` the interrupted run is
    checkpointed, so ``--resume`` continues it), one line says what was kept, and the exit code is
    130. An ``OSError`` while writing anything ends in one line naming the file and the cause and
    where the finished runs were kept, exit code 1. The outputs are written atomically,
    ``results.json`` last.
    """
    from .outputs import Locks

    with Locks() as held:
        return _run(args, held)


def _run(args, held) -> int:
    from ..engine.checkpoint import TrainingInterrupted
    from .experiment import run_experiment
    from .outputs import write_outputs
    from .preflight import PARTIAL_RESULTS, clear_output
    from .progress import Progress
    from .protocol import planned_runs
    from .report import format_table
    from .resume import interrupted, stop_on_signals

    cfg, store, data, old = _resolve(args, held)
    runs = sum(planned_runs(m, cfg.keep_ratios, cfg.select_seeds, cfg.seeds) for m in cfg.methods)
    _space_warnings(args, cfg, data, store, runs)
    clear_output(old)  # --overwrite: the earlier run's files go before this run writes any
    progress = None
    if not args.no_progress:
        progress = Progress(runs, stream=sys.stderr)
    with stop_on_signals():  # SIGINT/SIGTERM: stop after the current step (checkpoint with --checkpoint-dir)
        try:
            results = run_experiment(cfg, benchmark=data, progress=progress, store=store, parallel=args.parallel)
        except (TrainingInterrupted, KeyboardInterrupt) as stop:
            path = _write_partial(args, cfg, stop)
            kept = len(getattr(stop, "finished_runs", []))
            where = f"stopped during {stop.interrupted_run}" if getattr(stop, "interrupted_run", None) else "stopped"
            if store is not None:
                interrupted(store, stop)  # DIR/partial-results.json: the checkpoint dir's finished runs
                how = f"continue with: fsmtl run --resume {store.directory}"
            else:
                how = "no --checkpoint-dir, so a new run starts over (add --checkpoint-dir DIR to make runs resumable)"
            print(f"fsmtl: interrupted ({where}); {kept} finished run(s) kept in {path}; {how}", file=sys.stderr)
            return 130
        except OSError as exc:
            return _write_failed(args, cfg, store, exc, None)
    results["command"] = args.command_line
    try:
        figures = write_outputs(results, args.out)
    except OSError as exc:
        return _write_failed(args, cfg, store, exc, results)
    (args.out / PARTIAL_RESULTS).unlink(missing_ok=True)  # superseded by the complete results
    print(format_table(results))
    print(
        f"\n{results['seconds']:.0f} s; wrote {args.out}/results.json, results.csv, table.txt, "
        + ", ".join(p.name for p in figures)
    )
    return 0


def benchmarks_command() -> int:
    """``fsmtl benchmarks``: each benchmark, what it is, and its options with types and defaults."""
    from ..data import BENCHMARKS
    from .preflight import option_specs

    for name, entry in BENCHMARKS.items():
        print(f"{name}{' (local files)' if entry.local_files else ''}: {entry.description}")
        for spec in option_specs(entry):
            print(f"    -o {spec.describe()}")
        for key, value in entry.run_defaults.items():
            print(f"    run default: {key} = {value}")
    return 0


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"fsmtl: warning: {message}\n"


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)  # to tell given options from defaults (--resume)
    args.command_line = shlex.join(["fsmtl", *args.argv])
    try:
        if args.command == "benchmarks":
            return benchmarks_command()
        if args.command == "study":
            from .outputs import Locks
            from .study import load_spec, run_study

            spec = load_spec(args.spec)
            args.out.mkdir(parents=True, exist_ok=True)
            with Locks() as held, warnings.catch_warnings():
                warnings.formatwarning = _one_line_warning
                held.lock(args.out, "--out", "fsmtl study")  # one study per folder: its cells are shared
                run_study(spec, args.out, log=lambda line: print(line, flush=True))
            print(f"wrote {args.out}/report.md, study.json and figures")
            return 0
        if args.command == "info":
            from .info import report

            print(report())
            return 0
        with warnings.catch_warnings():
            warnings.formatwarning = _one_line_warning  # "fsmtl: warning: ..." instead of file:line
            return run_cli(args, run_command)  # torchrun / --nproc: fsmtl.run.launcher
    except (ValueError, TypeError, FileNotFoundError, NotADirectoryError, KeyError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"fsmtl: error: {str(message).splitlines()[0] if str(message) else type(exc).__name__}", file=sys.stderr)
        return 2
    except OSError as exc:  # a write before or after training (run.json, partial results on a stop)
        target = f" {exc.filename}" if exc.filename else ""
        print(f"fsmtl: error: cannot write{target}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fsmtl: interrupted outside training (while checking, loading data or writing results)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
