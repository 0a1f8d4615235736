"""Runs ``fsmtl run`` / ``fsmtl study`` on six fixed configurations and writes, per configuration,
the numbers of its results (``results.json`` or ``study.json`` without the fields that name the
time, the machine or the command line) as canonical JSON; ``--compare DIR`` then checks that two
such runs are identical to the last bit.

Used to prove that a change of the code's structure left every result as it was:

    python tools/same_results.py --out /tmp/before            # on the old commit
    python tools/same_results.py --out /tmp/after --compare /tmp/before

Each configuration runs in its own process with ``OMP_NUM_THREADS=1``; the six take about five
minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

# Fields that record when, where and how a run was launched, not what it computed.
VOLATILE = {
    "started_at",
    "ended_at",
    "environment",
    "seconds",
    "command",
    "finished_at",
    "seconds_this_invocation",
    "machine",
}

NARROW_SYNTHETIC_STUDY = {
    "name": "narrow-synthetic",
    "description": "the narrow (128) synthetic cell with conflicting tasks",
    "seeds": [0],
    "select_seeds": [100],
    "settings": {"epochs": 20},
    "grid": [
        {
            "benchmark": "synthetic",
            "benchmark_options": {"relatedness": 0.0},
            "hidden": 128,
            "methods": ["mtl", "fs", "stl-fs"],
            "keep_ratios": [0.1, 0.5],
        }
    ],
}

CONFIGS = {
    "default": ["run"],
    "mask-forward": ["run", "--methods", "fs", "--mask-forward", "--seeds", "0,1"],
    "heterogeneous": ["run", "--benchmark", "digits-dkl", "--methods", "mtl,fs", "--seeds", "0", "--epochs", "6"],
    "two-processes": [
        "run",
        "--nproc",
        "2",
        "--methods",
        "mtl,fs",
        "--seeds",
        "0",
        "--keep-ratios",
        "0.5",
        "--epochs",
        "4",
    ],
    "study-narrow-synthetic": ["study"],
    "shapes-gradnorm": ["run", "--benchmark", "shapes", "--methods", "gradnorm", "--seeds", "0"],
}


def numbers(value):
    """``value`` without the volatile fields, at any depth."""
    if isinstance(value, dict):
        return {k: numbers(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [numbers(v) for v in value]
    return value


def run(name: str, out: Path) -> Path:
    where = out / name
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = CONFIGS[name]
    if args[0] == "study":
        spec = out / f"{name}.spec.json"
        spec.write_text(json.dumps(NARROW_SYNTHETIC_STUDY))
        command = [sys.executable, "-m", "fsmtl", "study", str(spec), "--out", str(where)]
        produced = where / "study.json"
    else:
        command = [sys.executable, "-m", "fsmtl", *args, "--out", str(where), "--no-progress", "--overwrite"]
        produced = where / "results.json"
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
    canonical = out / f"{name}.json"
    canonical.write_text(json.dumps(numbers(json.loads(produced.read_text())), sort_keys=True, indent=1))
    return canonical


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--compare", type=Path, default=None, help="a directory of an earlier run of this script")
    parser.add_argument("--only", default=",".join(CONFIGS), help="comma-separated configurations")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    differ = []
    for name in args.only.split(","):
        canonical = run(name, args.out)
        if args.compare is None:
            print(f"{name}: {canonical}")
            continue
        same = canonical.read_text() == (args.compare / f"{name}.json").read_text()
        print(f"{name}: {'identical' if same else 'DIFFERENT'}")
        if not same:
            differ.append(name)
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
