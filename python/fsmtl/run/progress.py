"""Progress of ``fsmtl run``: one bar per run (method, seed, keep ratio) showing its phase (setup,
warm-up, mask update, training, evaluation).

On a terminal each run gets a ``tqdm`` bar that stays on screen when the run ends. When the stream
is not a terminal (a log file, a pipe) there are no carriage-return updates: one line when a run
starts, one every ``log_every`` seconds while it runs, and one when it ends with the time spent in
each phase.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

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


class RunProgress:
    """One run's progress: ``update(n)`` per training step (what :meth:`fsmtl.Trainer.fit` calls),
    ``phase(name)`` when the run's phase changes, ``close()`` at its end."""

    def __init__(self, owner: Progress, label: str, total: int) -> None:
        self.owner, self.label, self.total = owner, label, total
        self.steps = 0
        self.current = None
        self.since = self.start = time.perf_counter()
        self.last_line = self.start
        self.spent: dict[str, float] = {}
        self.bar = None
        if owner.tty:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total, desc=label, unit="step", file=owner.stream, leave=True, mininterval=0.5, dynamic_ncols=True
            )
        else:
            self._line(f"started, {total} steps")
        self.phase("setup")  # building the model and strategy, checking the data

    def _line(self, text: str) -> None:
        print(f"{self.label}: {text}", file=self.owner.stream, flush=True)

    def phase(self, name: str) -> None:
        if name == self.current:
            return
        now = time.perf_counter()
        if self.current is not None:
            self.spent[self.current] = self.spent.get(self.current, 0.0) + now - self.since
        self.current, self.since = name, now
        if self.bar is not None:
            self.bar.set_postfix_str(name)

    def update(self, n: int = 1) -> None:
        self.steps += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.perf_counter()
        if now - self.last_line >= self.owner.log_every:
            self.last_line = now
            self._line(f"{self.steps}/{self.total} steps, {self.current or 'training'}, {now - self.start:.0f} s")

    def close(self) -> None:
        self.phase("done")
        elapsed = time.perf_counter() - self.start
        if self.bar is not None:
            self.bar.close()
            return
        parts = ", ".join(f"{name} {self.spent[name]:.1f} s" for name in PHASES if name in self.spent)
        self._line(f"done, {self.steps}/{self.total} steps in {elapsed:.1f} s ({parts})")
