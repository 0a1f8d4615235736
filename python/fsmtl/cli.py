"""The ``fsmtl`` command: ``fsmtl run`` reproduces the paper's comparison on a benchmark."""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

from .distributed import run_cli


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


def _parse_value(value: str):
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    return value


def build_parser() -> argparse.ArgumentParser:
    import fsmtl_kernels as fk

    from .data import BENCHMARKS
    from .experiment import ExperimentConfig
    from .models import BACKBONES
    from .presets import PRESETS
    from .strategies import METHODS

    d = ExperimentConfig()
    parser = argparse.ArgumentParser(prog="fsmtl", description="Fisher Sparse Multi-Task Learning (AAAI-24).")
    sub = parser.add_subparsers(dest="command", required=True)
    bench_help = "; ".join(f"{k}: {v.summary}" for k, v in BENCHMARKS.items())
    run = sub.add_parser(
        "run",
        help="train and compare methods on a benchmark",
        description="Train STL, MTL, RS and FS (by default) over several seeds, choose each sparse method's keep "
        "ratio on validation, and report test metrics as in the paper's Table 1. Writes results.json, "
        "results.csv, table.txt and figures to --out.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    run.add_argument("--benchmark", default=d.benchmark, help=f"benchmark name ({bench_help})")
    run.add_argument(
        "--option",
        "-o",
        type=_option,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="benchmark option or data path, e.g. -o relatedness=0.2 or -o mnist_dir=/data/mnist",
    )
    run.add_argument(
        "--methods", type=_csv(str), default=list(d.methods), help=f"comma-separated subset of {tuple(METHODS)}"
    )
    run.add_argument("--seeds", type=_csv(int), default=list(d.seeds), help="comma-separated seeds")
    run.add_argument(
        "--keep-ratios",
        type=_csv(float),
        default=list(d.keep_ratios),
        help="grid of keep ratios p for the sparse methods, chosen on validation",
    )
    run.add_argument("--epochs", type=int, default=d.epochs)
    run.add_argument("--batch-size", type=int, default=d.batch_size)
    run.add_argument("--lr", type=float, default=d.lr, help="Adam learning rate")
    run.add_argument("--hidden", type=int, default=d.hidden, help="trunk width")
    run.add_argument("--warmup", type=int, default=d.warmup, help="dense warm-up epochs before the first mask")
    run.add_argument("--update-every", type=int, default=d.update_every, help="epochs between mask updates")
    run.add_argument("--samples", type=int, default=d.samples, help="examples per task for each Fisher estimate")
    run.add_argument("--mask-forward", action="store_true", help="run each task's forward on S_t * theta (Eq. 3)")
    run.add_argument(
        "--normalize",
        choices=fk.NORMALIZE_MODES,
        default=d.normalize,
        help="divide the masked sum by T, or by the number of tasks selecting each entry",
    )
    run.add_argument("--device", default=d.device, help="torch device, e.g. cpu or cuda")
    run.add_argument(
        "--model",
        choices=BACKBONES,
        default=d.model,
        help="trunk: auto (MLP, small CNN or dense CNN by the input), resnet18 or segnet (the paper's backbones)",
    )
    run.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="the paper's settings for a benchmark (model, batch, optimiser, epochs; sources in fsmtl.presets); "
        "add the data paths with -o; options given here win",
    )
    run.add_argument("--out", type=Path, default=Path("fsmtl-results"), help="output folder")
    run.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    run.add_argument("--amp", choices=("bf16", "fp16"), default=None, help="mixed precision of the forward pass")
    run.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="train on this many local processes (torch.distributed, gloo on CPU, NCCL on CUDA; the same as "
        "torchrun --standalone --nproc_per_node N -m fsmtl run ...); --batch-size is per process",
    )
    run.add_argument("--checkpoint-dir", type=Path, default=None, help="write resumable checkpoints to this folder")
    run.add_argument("--checkpoint-every", type=int, default=1, help="epochs between checkpoints (--checkpoint-dir)")
    run.add_argument("--resume", type=Path, default=None, metavar="DIR", help="continue the run checkpointed in DIR")
    sub.add_parser("benchmarks", help="list the built-in benchmarks")
    return parser


def run_command(args) -> int:
    from tqdm.auto import tqdm

    from .experiment import ExperimentConfig, run_experiment
    from .report import format_table, plot_figures, write_csv, write_json

    # Every option but --option/--out/--no-progress is named like an ExperimentConfig field.
    settings = {f.name: getattr(args, f.name) for f in fields(ExperimentConfig) if hasattr(args, f.name)}
    settings["benchmark_options"] = {k: _parse_value(v) for k, v in args.option}
    from .presets import resolve_settings
    from .resume import explicit_options, interrupted, prepare, stop_on_signals

    given = explicit_options(build_parser(), args.argv)
    settings = resolve_settings(settings, given, args.preset)  # --preset, then the benchmark's run defaults
    explicit = given if args.resume is not None else set()
    settings, store = prepare(args, settings, explicit)  # --resume: the saved settings; sets args.out
    cfg = ExperimentConfig(**settings)

    def progress(total: int):
        return tqdm(total=total, desc="fsmtl run", unit="step", disable=args.no_progress, file=sys.stderr)

    from .checkpoint import TrainingInterrupted

    with stop_on_signals():  # SIGINT/SIGTERM: stop after the current step, checkpoint, exit 130
        try:
            results = run_experiment(cfg, progress_factory=progress, store=store)
        except TrainingInterrupted as stop:
            print(interrupted(store, stop), file=sys.stderr)
            return 130
    args.out.mkdir(parents=True, exist_ok=True)
    table = format_table(results)
    (args.out / "table.txt").write_text(table + "\n")
    write_json(results, args.out / "results.json")
    write_csv(results, args.out / "results.csv")
    figures = plot_figures(results, args.out)
    print(table)
    print(
        f"\n{results['seconds']:.0f} s; wrote {args.out}/results.json, results.csv, table.txt, "
        + ", ".join(p.name for p in figures)
    )
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)  # to tell given options from defaults (--resume)
    try:
        if args.command == "benchmarks":
            from .data import BENCHMARKS

            for name, entry in BENCHMARKS.items():
                print(f"{name}: {entry.summary}")
            return 0
        return run_cli(args, run_command)  # torchrun / --nproc: fsmtl.distributed
    except (ValueError, TypeError, FileNotFoundError, NotADirectoryError, KeyError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"fsmtl: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
