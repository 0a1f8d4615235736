"""The fingerprint of one ``fsmtl run``: its resolved settings, the world size, the global batch
and the project version (:func:`run_fingerprint`). ``run.json`` records it; each run's Trainer adds
it to its own (:mod:`fsmtl.engine.fingerprint`), so that every checkpoint and finished result of
the run carries it, and ``results.json`` reports it. ``--resume`` compares it before anything
trains (:func:`check_resumable`)."""

from __future__ import annotations

from pathlib import Path

from ..collectives import world_size
from ..engine.fingerprint import check_same_run, project_version

#: Settings that decide where a run writes, not what it computes.
NOT_DECIDING = ("out", "checkpoint_every")


def jsonable(value):
    """``value`` as JSON would read it back (paths as strings, tuples as lists)."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (tuple, list)):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    return value


def run_fingerprint(settings: dict) -> dict:
    """The fingerprint of a run of ``settings`` (ExperimentConfig fields) in this process group."""
    w = world_size()
    fp = {"fsmtl version": project_version(), "world size": w, "global batch": settings["batch_size"] * w}
    for key in sorted(settings):
        if key not in NOT_DECIDING:
            fp[f"setting {key}"] = jsonable(settings[key])
    return fp


def run_part(fingerprint: dict, run: dict) -> dict:
    """The entries of ``fingerprint`` that a run fingerprint ``run`` has (a Trainer's fingerprint
    holds the run's and its own)."""
    return {k: fingerprint.get(k, "absent") for k in run}


def check_resumable(saved: dict | None, settings: dict, directory: Path) -> None:
    """Refuse ``--resume directory`` when its run fingerprint ``saved`` is not this process
    group's and version's: one line naming each difference (both world sizes when they differ)."""
    mine = run_fingerprint(settings)
    if isinstance(saved, dict) and saved.get("world size") != mine["world size"]:
        w = saved.get("world size")
        raise ValueError(
            f"--resume {directory}: the run was trained on {w} process(es) (global batch {saved.get('global batch')}), "
            f"this one runs on {mine['world size']} (global batch {mine['global batch']}), which would continue with "
            f"another global batch at another position in the epoch; resume it with --nproc {w} "
            f"(or torchrun with {w} processes)"
        )
    check_same_run(saved, mine, f"--resume {directory}")
