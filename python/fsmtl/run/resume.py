"""Resumable experiments: the checkpoint directory of ``fsmtl run --checkpoint-dir DIR``, resuming
with ``fsmtl run --resume DIR``, and stopping cleanly on SIGINT/SIGTERM.

Layout of DIR::

    run.json                      the run's settings (ExperimentConfig fields, --out, checkpoint options)
                                  and its fingerprint (fsmtl.run.fingerprint)
    runs/<method>-p<ratio>-s<seed>-<tasks>/
        ckpt-<step>.pt            Trainer checkpoints (atomic, newest kept)
        result.pt                 the finished run's result and fingerprint (atomic); its presence means "done"

Every file is written atomically (:mod:`fsmtl.engine.checkpoint`), so ``kill -9`` at any moment leaves a
directory that resumes: finished runs are read back, the interrupted one continues from its newest
checkpoint bit for bit, and the final results equal an uninterrupted run's (timing fields aside).

Every checkpoint and result carries the run's fingerprint: ``--resume`` refuses, before anything
trains, a directory of another process count or version, and any checkpoint or result of another
run copied into it, naming each differing setting. Damaged files never end in a traceback: an
unreadable checkpoint is skipped with a warning (the next older one is used), an unreadable result
is trained again with a warning, an unreadable ``run.json`` is named.
"""

from __future__ import annotations

import json
import signal
import warnings
from contextlib import contextmanager
from pathlib import Path

from ..collectives import barrier, is_main_process
from ..engine import checkpoint as ckpt
from ..engine.fingerprint import check_same_run
from .fingerprint import check_resumable, jsonable, run_fingerprint, run_part

RUN_FILE = "run.json"
RESULT_FILE = "result.pt"
#: Marks a finished run's file (and its layout): ``{RESULT_KEY: 1, "fingerprint": ..., "result": ...}``.
RESULT_KEY = "fsmtl_result"


class RunStore:
    """Per-run checkpoints and finished results under one directory.

    Args:
        directory: the checkpoint directory.
        every, unit: checkpoint every ``every`` ``unit`` (``"epoch"`` or ``"step"``).
        keep_last: checkpoints kept per run.
    """

    def __init__(self, directory, *, every: int = 1, unit: str = "epoch", keep_last: int = 2) -> None:
        self.directory = Path(directory)
        self.every, self.unit, self.keep_last = every, unit, keep_last

    def run_dir(self, method: str, seed: int, keep_ratio: float, tasks) -> Path:
        names = "+".join(t.name for t in tasks) if len(tasks) == 1 else f"{len(tasks)}tasks"
        return self.directory / "runs" / f"{method}-p{keep_ratio:g}-s{seed}-{names}"

    def finished(self, run_dir: Path, fingerprint: dict) -> dict | None:
        """The finished result of ``run_dir``, None when it has none (or an unreadable one, which is
        named in a warning: the run is trained again); ``ValueError`` when it is another run's."""
        path = run_dir / RESULT_FILE
        if not path.is_file():
            return None
        try:
            record = read_result(path)
        except ValueError as exc:
            warnings.warn(f"{exc}; the run is trained again", UserWarning, stacklevel=2)
            return None
        check_same_run(record["fingerprint"], fingerprint, str(path))
        return record["result"]

    def train(
        self, trainer, train, *, epochs: int, batch_size: int, run_dir: Path, progress=None, **fit_options
    ) -> dict:
        """Resume ``trainer`` from ``run_dir``'s newest checkpoint (if any) and train it up to
        ``epochs`` epochs in all, checkpointing as configured; returns the history.
        ``fit_options``: further :meth:`~fsmtl.Trainer.fit` arguments (validation data)."""
        trainer.resume(run_dir)
        if progress is not None and trainer.global_step:
            progress.update(trainer.global_step)
        return trainer.fit(
            train,
            epochs=max(epochs - trainer.epoch, 0),
            batch_size=batch_size,
            checkpoint_dir=run_dir,
            checkpoint_every=self.every,
            checkpoint_unit=self.unit,
            keep_last=self.keep_last,
            progress=progress,
            **fit_options,
        )

    def finish(self, run_dir: Path, result: dict, fingerprint: dict) -> dict:
        if is_main_process():  # rank 0 alone writes in a multi-process run
            ckpt.atomic_save({RESULT_KEY: 1, "fingerprint": fingerprint, "result": result}, run_dir / RESULT_FILE)
            for path in ckpt.checkpoints(run_dir):
                path.unlink(missing_ok=True)  # the result is all a finished run needs
        return result

    def finished_count(self) -> int:
        return sum(1 for _ in self.directory.glob(f"runs/*/{RESULT_FILE}"))

    def finished_results(self) -> dict[str, dict]:
        """The readable finished results by run name (unreadable ones are left out)."""
        out = {}
        for path in sorted(self.directory.glob(f"runs/*/{RESULT_FILE}")):
            try:
                out[path.parent.name] = read_result(path)["result"]
            except ValueError:
                continue
        return out

    def check_runs(self, run: dict) -> None:
        """Refuse a result or newest checkpoint of another run (run fingerprint ``run``) under
        ``runs/``, before anything trains; damaged files are left to the warnings of their use."""
        for run_dir in sorted(self.directory.glob("runs/*")):
            candidates = [run_dir / RESULT_FILE] if (run_dir / RESULT_FILE).is_file() else []
            candidates += list(reversed(ckpt.checkpoints(run_dir)))[:1]
            for path in candidates:
                try:
                    fp = read_result(path)["fingerprint"] if path.name == RESULT_FILE else ckpt.read_state(path)
                except ValueError:
                    continue
                if path.name != RESULT_FILE:
                    fp = fp.get("fingerprint")
                check_same_run(run_part(fp, run) if isinstance(fp, dict) else fp, run, str(path))


def read_result(path: Path) -> dict:
    """A finished run's record (``RESULT_KEY``, ``fingerprint``, ``result``); ``ValueError``
    naming the file and the damage when it does not load or holds something else."""
    record = ckpt.load_verified(path)
    if not isinstance(record, dict) or record.get(RESULT_KEY) != 1 or not {"fingerprint", "result"} <= set(record):
        raise ValueError(f"{path} is unreadable (not a finished-run record of this fsmtl version)")
    return record


def prepare(args, settings: dict, explicit: set[str]) -> tuple[dict, RunStore | None]:
    """Settings and store of a new (``--checkpoint-dir``) or resumed (``--resume``) run.

    ``settings``: the ExperimentConfig fields plus ``out``, ``checkpoint_every``, ``checkpoint_unit``
    from the command line. On ``--resume`` the saved settings win; an option given on the command
    line with another value than the saved one is a ``ValueError``.
    """
    resume_dir = getattr(args, "resume", None)
    new_dir = getattr(args, "checkpoint_dir", None)
    if resume_dir is None and new_dir is None:
        return settings, None
    if args.checkpoint_every < 1:
        raise ValueError(f"--checkpoint-every must be >= 1, got {args.checkpoint_every}")
    settings = {**settings, "out": str(args.out), "checkpoint_every": args.checkpoint_every}
    if resume_dir is not None:
        directory = Path(resume_dir)
        saved = read_run_file(directory)
        if new_dir is not None and Path(new_dir) != directory:
            raise ValueError(f"--checkpoint-dir {new_dir} conflicts with --resume {directory}")
        if "option" in explicit:
            explicit = explicit | {"benchmark_options"}
        for name, value in settings.items():
            if name in explicit and jsonable(value) != saved.get(name):
                flag = "-o" if name == "benchmark_options" else "--" + name.replace("_", "-")
                raise ValueError(
                    f"{flag} {jsonable(value)!r} conflicts with the checkpointed run's {saved.get(name)!r} "
                    f"(omit it or repeat the original value)"
                )
        fingerprint = saved.pop("fingerprint", None)
        settings = dict(saved)
        check_resumable(fingerprint, settings, directory)
        RunStore(directory).check_runs(run_fingerprint(settings))
    else:
        directory = Path(new_dir)
        path = directory / RUN_FILE
        if is_main_process():  # several processes: rank 0 writes, the others read it after the barrier
            if path.is_file():
                raise ValueError(
                    f"--checkpoint-dir {directory} already holds a run; continue it with --resume {directory}"
                )
            record = {**{k: jsonable(v) for k, v in settings.items()}, "fingerprint": run_fingerprint(settings)}
            ckpt.atomic_write_text(json.dumps(record, indent=1), path)
        barrier()
        settings = read_run_file(directory)
        settings.pop("fingerprint", None)
    store = RunStore(directory, every=settings.pop("checkpoint_every"))
    out = Path(settings.pop("out"))
    if is_main_process():  # other ranks keep the scratch folder fsmtl.run.launcher gave them
        args.out = out
    return settings, store


def read_run_file(directory: Path) -> dict:
    """``DIR/run.json``; ``FileNotFoundError``/``ValueError`` naming it when missing or unreadable."""
    path = Path(directory) / RUN_FILE
    if not path.is_file():
        raise FileNotFoundError(f"--resume {directory}: no {RUN_FILE} there (not a fsmtl checkpoint directory)")
    try:
        saved = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ValueError(
            f"--resume {directory}: {path} is unreadable ({exc}); it holds the run's settings, without which the run "
            "cannot be resumed"
        ) from None
    if not isinstance(saved, dict):
        raise ValueError(f"--resume {directory}: {path} is unreadable (holds a {type(saved).__name__}, not settings)")
    return saved


@contextmanager
def stop_on_signals():
    """While active, SIGINT and SIGTERM ask training to stop after the current step (a Trainer then
    writes a checkpoint and raises :class:`~fsmtl.engine.checkpoint.TrainingInterrupted`); a second signal
    before that raises ``KeyboardInterrupt`` at once (for a step that takes too long)."""
    ckpt.STOP.clear()
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum, frame):
        if ckpt.STOP.is_set():
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}")
        ckpt.STOP.set()

    for s in previous:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        ckpt.STOP.clear()


def interrupted(store: RunStore | None, stop: Exception) -> str:
    """Write the finished runs' results so far (``DIR/partial-results.json``) and return the one
    line the command prints."""
    if store is None:
        return f"fsmtl: interrupted ({stop}); no --checkpoint-dir, nothing saved"
    finished = {name: {"val": r["val"], "test": r["test"]} for name, r in store.finished_results().items()}
    if is_main_process():
        ckpt.atomic_write_text(json.dumps(finished, indent=1), store.directory / "partial-results.json")
    return (
        f"fsmtl: interrupted ({stop}); {len(finished)} run(s) finished, checkpoint in {store.directory}; "
        f"continue with: fsmtl run --resume {store.directory}"
    )
