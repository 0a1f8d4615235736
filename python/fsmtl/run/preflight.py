"""Checks ``fsmtl run`` makes before any training: benchmark and method names, every ``-o`` value
typed against the benchmark builder's signature, and the output directory (writable, created if
missing, not holding another run's results unless ``--overwrite``; a resumed run replaces the
outputs its own interrupted write left).

Every failure is a :class:`PreflightError` (a ``ValueError``) whose message is one line; the
command prints it as ``fsmtl: error: ...`` and exits with code 2.
"""

from __future__ import annotations

import inspect
import os
import tempfile
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# What ``fsmtl run`` writes to --out; a directory holding any of them holds another run's results.
OUTPUT_FILES = ("results.json", "results.csv", "table.txt", "partial-results.json", "keep_ratio_curve.png")
OUTPUT_PATTERNS = ("per_task_*.png", "overlap_*.png")
PARTIAL_RESULTS = "partial-results.json"


class PreflightError(ValueError):
    """A misuse found before training; the message is one line."""


@dataclass(frozen=True)
class OptionSpec:
    """One option of a benchmark builder: its name, type (as written in ``fsmtl benchmarks``),
    default (``required`` when it has none) and the parser of its ``-o KEY=VALUE`` text."""

    name: str
    type: str
    default: Any
    required: bool
    parse: Callable[[str], Any]

    def describe(self) -> str:
        default = "required" if self.required else f"default {self.default!r}"
        return f"{self.name} ({self.type}, {default})"


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("true", "1", "yes", "on"):
        return True
    if value in ("false", "0", "no", "off"):
        return False
    raise ValueError("expected true or false")


def _number(kind: type) -> Callable[[str], Any]:
    def parse(text: str):
        try:
            return kind(text)
        except ValueError:
            raise ValueError(f"expected {'an integer' if kind is int else 'a number'}") from None

    return parse


def _list_of(parse: Callable[[str], Any]) -> Callable[[str], list]:
    def parse_list(text: str) -> list:
        values = [parse(v) for v in text.split(",") if v.strip()]
        if not values:
            raise ValueError("expected a comma-separated list")
        return values

    return parse_list


def _parser_for(hint) -> tuple[str, Callable[[str], Any]]:
    """(type label, parser) of a builder's parameter annotation."""
    if hint is bool:
        return "bool", _bool
    if hint is int:
        return "int", _number(int)
    if hint is float:
        return "float", _number(float)
    if hint is str or hint is os.PathLike or typing.get_origin(hint) is os.PathLike:
        return ("path" if hint is not str else "str"), str
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        optional = type(None) in args
        rest = [a for a in args if a is not type(None)]
        if all(a is str or typing.get_origin(a) is os.PathLike or a is os.PathLike for a in rest):
            label, parse = "path", str
        elif len(rest) == 1:
            label, parse = _parser_for(rest[0])
        else:
            # e.g. ``float | Sequence[float]``: one value, or a comma-separated list of them.
            scalar_label, scalar = _parser_for(rest[0])
            label = f"{scalar_label} or list of {scalar_label}"

            def parse(text: str, scalar=scalar):
                parts = [p for p in text.split(",") if p.strip()]
                return scalar(parts[0]) if len(parts) == 1 else _list_of(scalar)(text)

        if optional:
            inner = parse

            def parse(text: str, inner=inner):
                return None if text.strip().lower() == "none" else inner(text)

            label += " or none"
        return label, parse
    if origin in (list, tuple, Sequence, typing.Sequence) or (origin is not None and issubclass(origin, Sequence)):
        label, parse = _parser_for(args[0] if args else str)
        return f"comma-separated {label}s", _list_of(parse)
    return "str", str


def option_specs(entry) -> list[OptionSpec]:
    """Every option of a :class:`~fsmtl.data.registry.BenchmarkEntry` (``seed`` aside), typed from its
    builder's annotations, in signature order."""
    signature = inspect.signature(entry.builder)
    hints = typing.get_type_hints(entry.builder)
    specs = []
    for name, param in signature.parameters.items():
        if name == "seed":
            continue
        label, parse = _parser_for(hints.get(name, str))
        if name in entry.from_text:
            parse = entry.from_text[name]
        required = param.default is param.empty
        specs.append(OptionSpec(name, label, None if required else param.default, required, parse))
    return specs


def benchmark_choices() -> str:
    """Every benchmark name, built-in ones first, for error messages."""
    from ..data import BENCHMARKS

    built_in = [n for n, e in BENCHMARKS.items() if not e.local_files]
    files = [n for n, e in BENCHMARKS.items() if e.local_files]
    return f"{', '.join(built_in)} (built in); {', '.join(files)} (from local files, see fsmtl benchmarks)"


def check_benchmark(name: str):
    """The registry entry of benchmark ``name``; PreflightError listing every benchmark otherwise."""
    from ..data import BENCHMARKS

    if name not in BENCHMARKS:
        raise PreflightError(f"unknown benchmark {name!r}; choose one of {benchmark_choices()}")
    return BENCHMARKS[name]


def parse_options(benchmark: str, pairs: Sequence[tuple[str, str]]) -> dict:
    """``-o KEY=VALUE`` texts typed against benchmark ``benchmark``'s options."""
    entry = check_benchmark(benchmark)
    specs = {s.name: s for s in option_specs(entry)}
    parsed = {}
    for key, text in pairs:
        if key not in specs:
            valid = ", ".join(s.describe() for s in specs.values())
            raise PreflightError(f"-o {key}: benchmark {benchmark!r} has no option {key!r}; its options: {valid}")
        try:
            parsed[key] = specs[key].parse(text)
        except ValueError as exc:
            raise PreflightError(
                f"-o {key}={text}: {exc} ({specs[key].describe()} of benchmark {benchmark!r})"
            ) from None
    return parsed


def check_methods(methods: Sequence[str]) -> None:
    """Every method known (a plain name or a composable ``ARCH+WEIGHTING``) and its optional
    packages installed."""
    from ..strategies import ARCHITECTURES, METHODS, WEIGHTINGS, get_method

    unknown = [m for m in methods if m not in METHODS and "+" not in m]
    if unknown or not methods:
        raise PreflightError(
            f"unknown method(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(METHODS)}, or "
            f"ARCH+WEIGHTING with ARCH one of {', '.join(ARCHITECTURES)} and WEIGHTING one of {', '.join(WEIGHTINGS)}"
        )
    for name in methods:
        try:
            missing = get_method(name).missing_packages()
        except ValueError as exc:  # a composition that cannot work, with its reason
            raise PreflightError(str(exc)) from None
        if missing:
            raise PreflightError(f'method {name!r} needs {", ".join(missing)}: pip install -e ".[peers]" installs them')


def check_writable_dir(path: Path, flag: str) -> None:
    """Create ``path`` if missing and make sure a file can be written in it."""
    if path.exists() and not path.is_dir():
        raise PreflightError(f"{flag} {path} is a file, not a directory; choose another {flag}")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".fsmtl-write-check-"):
            pass
    except OSError as exc:
        raise PreflightError(f"{flag} {path} is not writable: {exc.strerror or exc}") from None


def old_results(out: Path) -> list[Path]:
    """The files of an earlier ``fsmtl run`` in ``out``."""
    if not out.is_dir():
        return []
    found = [out / name for name in OUTPUT_FILES if (out / name).is_file()]
    for pattern in OUTPUT_PATTERNS:
        found += sorted(out.glob(pattern))
    return found


def check_output(out: Path, *, overwrite: bool, resume: bool = False) -> list[Path]:
    """``out`` created and writable, and not holding another run's results unless ``overwrite``
    (a resumed run may find its own interrupted run's ``partial-results.json``). Returns the old
    files that :func:`clear_output` removes once every other check has passed."""
    check_writable_dir(out, "--out")
    old = old_results(out)
    complete = (out / "results.json").is_file()
    if resume:
        # Its own interrupted run's partial results, and the outputs of a write that stopped before
        # results.json (written last), are the resumed run's to replace.
        old = [p for p in old if p.name != PARTIAL_RESULTS] if complete else []
    if old and not overwrite:
        names = ", ".join(p.name for p in old[:4]) + (", ..." if len(old) > 4 else "")
        if not complete and not (out / PARTIAL_RESULTS).is_file():
            raise PreflightError(
                f"--out {out} holds the outputs of a run that stopped while writing them ({names}; no results.json): "
                "resume that run with --resume DIR, pass --overwrite to replace them, or choose another --out"
            )
        raise PreflightError(
            f"--out {out} holds another run's results ({names}); pass --overwrite to replace them "
            "or choose another --out"
        )
    return old_results(out) if overwrite else []


def clear_output(files: Sequence[Path]) -> None:
    for path in files:
        path.unlink(missing_ok=True)
