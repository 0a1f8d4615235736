"""Progress of ``fsmtl run``: one bar per run (method, seed, keep ratio) showing its phase (setup,
warm-up, mask update, training, evaluation).

On a terminal each run gets a ``tqdm`` bar that stays on screen when the run ends. When the stream
is not a terminal (a log file, a pipe) there are no carriage-return updates: one line when a run
starts, one every ``log_every`` seconds while it runs, and one when it ends with the time spent in
each phase.
"""

from __future__ import annotations

import sys
from typing import TextIO

from ..engine.fit_log import FitProgress

PHASES = ("setup", "warm-up", "mask update", "training", "evaluation")


class Progress:
    """Makes the bar of each run.

    Args:
        n_runs: how many runs the experiment has (shown as ``[i/n]``).
        stream: where progress goes (stderr by default).
        tty: draw bars (True) or write plain lines (False); by default, whether ``stream`` is a terminal.
        log_every: seconds between the plain lines of a running run.
    """

    def __init__(self, n_runs: int, *, stream: TextIO | None = None, tty: bool | None = None, log_every: float = 60.0):
        self.n_runs = n_runs
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)()) if tty is None else tty
        self.log_every = log_every
        self.started = 0

    def run(self, label: str, total: int) -> RunProgress:
        """The bar of the next run, ``label`` naming it (e.g. ``fs seed 0 p=50%``), ``total`` its steps."""
        self.started += 1
        return RunProgress(self, f"[{self.started}/{self.n_runs}] {label}", total)


class RunProgress(FitProgress):
    """One run's progress: ``update(n)`` per training step (what :meth:`fsmtl.Trainer.fit` calls),
    ``phase(name)`` when the run's phase changes, ``close()`` at its end."""

    def __init__(self, owner: Progress, label: str, total: int) -> None:
        super().__init__(total, label=label, stream=owner.stream, tty=owner.tty, log_every=owner.log_every,
                         leave=True, announce=True, order=PHASES)  # fmt: skip
        self.phase("setup")  # building the model and strategy, checking the data
