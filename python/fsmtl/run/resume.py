"""Resumable experiments: the checkpoint directory of ``fsmtl run --checkpoint-dir DIR``, resuming
with ``fsmtl run --resume DIR``, and stopping cleanly on SIGINT/SIGTERM.

Layout of DIR::

    run.json                      the run's settings (ExperimentConfig fields, --out, checkpoint options)
    runs/<method>-p<ratio>-s<seed>-<tasks>/
        ckpt-<step>.pt            Trainer checkpoints (atomic, newest kept)
        result.pt                 the finished run's result (atomic); its presence means "done"

Every file is written atomically (:mod:`fsmtl.engine.checkpoint`), so ``kill -9`` at any moment leaves a
directory that resumes: finished runs are read back, the interrupted one continues from its newest
checkpoint bit for bit, and the final results equal an uninterrupted run's (timing fields aside).
"""

from __future__ import annotations

import json
import signal
from contextlib import contextmanager
from pathlib import Path

import torch

from ..collectives import barrier, is_main_process
from ..engine import checkpoint as ckpt

RUN_FILE = "run.json"


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

    def finished(self, run_dir: Path) -> dict | None:
        path = run_dir / "result.pt"
        return torch.load(path, weights_only=False) if path.is_file() else None

    def train(self, trainer, train, *, epochs: int, batch_size: int, run_dir: Path, progress=None) -> dict:
        """Resume ``trainer`` from ``run_dir``'s newest checkpoint (if any) and train it up to
        ``epochs`` epochs in all, checkpointing as configured; returns the history."""
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
        )

    def finish(self, run_dir: Path, result: dict) -> dict:
        if is_main_process():  # rank 0 alone writes in a multi-process run
            ckpt.atomic_save(result, run_dir / "result.pt")
            for path in ckpt.checkpoints(run_dir):
                path.unlink(missing_ok=True)  # the result is all a finished run needs
        return result

    def finished_count(self) -> int:
        return sum(1 for _ in self.directory.glob("runs/*/result.pt"))


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
        path = directory / RUN_FILE
        if not path.is_file():
            raise FileNotFoundError(f"--resume {directory}: no {RUN_FILE} there (not a fsmtl checkpoint directory)")
        saved = json.loads(path.read_text())
        if new_dir is not None and Path(new_dir) != directory:
            raise ValueError(f"--checkpoint-dir {new_dir} conflicts with --resume {directory}")
        if "option" in explicit:
            explicit = explicit | {"benchmark_options"}
        for name, value in settings.items():
            if name in explicit and _jsonable(value) != saved.get(name):
                flag = "-o" if name == "benchmark_options" else "--" + name.replace("_", "-")
                raise ValueError(
                    f"{flag} {_jsonable(value)!r} conflicts with the checkpointed run's {saved.get(name)!r} "
                    f"(omit it or repeat the original value)"
                )
        settings = dict(saved)
    else:
        directory = Path(new_dir)
        path = directory / RUN_FILE
        if is_main_process():  # several processes: rank 0 writes, the others read it after the barrier
            if path.is_file():
                raise ValueError(
                    f"--checkpoint-dir {directory} already holds a run; continue it with --resume {directory}"
                )
            ckpt.atomic_write_text(json.dumps({k: _jsonable(v) for k, v in settings.items()}, indent=1), path)
        barrier()
        settings = json.loads(path.read_text())
    store = RunStore(directory, every=settings.pop("checkpoint_every"))
    out = Path(settings.pop("out"))
    if is_main_process():  # other ranks keep the scratch folder fsmtl.run.launcher gave them
        args.out = out
    return settings, store


def _jsonable(value):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


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
    finished = {}
    for path in sorted(store.directory.glob("runs/*/result.pt")):
        result = torch.load(path, weights_only=False)
        finished[path.parent.name] = {"val": result["val"], "test": result["test"]}
    if is_main_process():
        ckpt.atomic_write_text(json.dumps(finished, indent=1), store.directory / "partial-results.json")
    return (
        f"fsmtl: interrupted ({stop}); {len(finished)} run(s) finished, checkpoint in {store.directory}; "
        f"continue with: fsmtl run --resume {store.directory}"
    )
