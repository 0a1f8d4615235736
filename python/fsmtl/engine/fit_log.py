"""What ``Trainer.fit`` shows and writes while it trains.

* Progress: by default a ``tqdm`` bar on a terminal (stderr), and plain lines in a log file or
  pipe (one every minute, and one at the end); ``progress=None`` shows nothing, and any object
  with ``update(n)`` (and optionally ``phase(name)``) may be passed instead.
* Records: per step the task losses, per mask update the masks' kept fraction, churn and mean
  overlap between tasks, per validation the metrics and score; as JSON lines (``log_path``, one
  object per line with its ``"event"``: ``step``, ``mask_update`` or ``val``), as CSV
  (``csv_path``: ``event, epoch, step, name, value``) and to TensorBoard (``tensorboard_dir``,
  through ``torch.utils.tensorboard``; needs the ``tensorboard`` package). Only rank 0 writes.
"""

from __future__ import annotations

import csv
import json
import sys
import time
from pathlib import Path


class FitProgress:
    """A progress display of a stretch of training steps: a ``tqdm`` bar on a terminal, plain lines
    elsewhere (one at the start with ``announce``, one every ``log_every`` seconds, one at the end
    with the time spent in each phase). ``fit``'s default, and each run's bar of ``fsmtl run``.

    Args:
        total: the steps it will count (None: unknown).
        label: what the lines (and the bar) are called.
        stream: where it goes (stderr by default).
        tty: a bar (True) or plain lines (False); by default, whether ``stream`` is a terminal
            (plain lines also without the optional ``tqdm``).
        log_every: seconds between the plain lines.
        leave: keep the bar on screen when it closes.
        announce: a plain line when it starts.
        order: the phases in the order the closing line lists them (default: as they came).
    """

    def __init__(
        self,
        total: int | None,
        *,
        label: str = "fit",
        stream=None,
        tty: bool | None = None,
        log_every: float = 60.0,
        leave: bool = False,
        announce: bool = False,
        order: tuple[str, ...] = (),
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.total, self.label, self.log_every, self.order = total, label, log_every, order
        self.steps, self.current = 0, None
        self.since = self.start = self.last = time.perf_counter()
        self.spent: dict[str, float] = {}
        self.bar = None
        if getattr(self.stream, "isatty", lambda: False)() if tty is None else tty:
            try:
                from tqdm import tqdm
            except ImportError:  # tqdm is an optional extra: plain lines without it
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=total, desc=label, unit="step", file=self.stream, leave=leave, mininterval=0.5,
                                dynamic_ncols=True)  # fmt: skip
        if self.bar is None and announce:
            self._line(f"started, {total} steps")

    def _line(self, text: str) -> None:
        print(f"{self.label}: {text}", file=self.stream, flush=True)

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
        if now - self.last >= self.log_every:
            self.last = now
            self._line(f"{self.steps}/{self.total} steps, {self.current or 'training'}, {now - self.start:.0f} s")

    def close(self) -> None:
        self.phase("done")
        elapsed = time.perf_counter() - self.start
        if self.bar is not None:
            self.bar.close()
            return
        names = [n for n in self.order if n in self.spent] + [n for n in self.spent if n not in self.order]
        parts = ", ".join(f"{name} {self.spent[name]:.1f} s" for name in names)
        self._line(f"done, {self.steps}/{self.total} steps in {elapsed:.1f} s" + (f" ({parts})" if parts else ""))


class FitLog:
    """The records of one ``fit`` to JSON lines, CSV and TensorBoard (each optional).

    Args:
        task_names: the tasks, in head order (the loss records are keyed by them).
        log_path, csv_path: files appended to (a resumed run continues them).
        tensorboard_dir: a ``SummaryWriter`` directory.
        write: False on ranks other than 0 (nothing is written there).
    """

    def __init__(self, task_names, *, log_path=None, csv_path=None, tensorboard_dir=None, write: bool = True) -> None:
        self.task_names = list(task_names)
        self.json = open(log_path, "a") if log_path is not None and write else None  # noqa: SIM115 (closed by close())
        self.csv_file = open(csv_path, "a", newline="") if csv_path is not None and write else None  # noqa: SIM115
        self.csv = None
        if self.csv_file is not None:
            self.csv = csv.writer(self.csv_file)
            if self.csv_file.tell() == 0:
                self.csv.writerow(["event", "epoch", "step", "name", "value"])
        self.tensorboard = None
        if tensorboard_dir is not None and write:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise ImportError(
                    "tensorboard_dir needs the tensorboard package: pip install tensorboard "
                    '(or pip install "fsmtl-kernels[tensorboard]")'
                ) from exc
            self.tensorboard = SummaryWriter(str(Path(tensorboard_dir)))

    @property
    def active(self) -> bool:
        return self.json is not None or self.csv is not None or self.tensorboard is not None

    def _write(self, event: str, epoch: int, step: int, values: dict[str, float], extra: dict | None = None) -> None:
        if self.json is not None:
            self.json.write(
                json.dumps({"event": event, "epoch": epoch, "step": step, **values, **(extra or {})}) + "\n"
            )
        if self.csv is not None:
            for name, value in values.items():
                self.csv.writerow([event, epoch, step, name, value])
        if self.tensorboard is not None:
            for name, value in values.items():
                self.tensorboard.add_scalar(f"{event}/{name}", value, step)

    def step(self, epoch: int, step: int, losses) -> None:
        """One training step's task losses (``losses``: T floats in head order)."""
        self._write("step", epoch, step, {f"loss/{n}": float(v) for n, v in zip(self.task_names, losses)})

    def mask_update(self, epoch: int, step: int, record: dict, num_entries: int | None) -> None:
        """A mask update's record (ones, churn, overlap per task) as per-task kept fraction and
        churn and the mean overlap between two different tasks."""
        values = {}
        for t, name in enumerate(self.task_names):
            if num_entries:
                values[f"kept/{name}"] = record["ones"][t] / num_entries
            if record["churn"] is not None:
                values[f"churn/{name}"] = record["churn"][t]
        overlap = record["overlap"]
        pairs = [overlap[a][b] for a in range(len(overlap)) for b in range(len(overlap)) if a != b]
        if pairs:
            values["overlap/mean"] = sum(pairs) / len(pairs)
        self._write("mask_update", epoch, step, values)

    def validation(self, entry: dict) -> None:
        """A validation record as kept in ``history["val"]`` (epoch, step, loss, metrics, score)."""
        values = {"score": entry["score"]}
        for name, metrics in zip(self.task_names, entry["metrics"]):
            values.update({f"{metric}/{name}": value for metric, value in metrics.items()})
        if self.json is not None:
            self.json.write(json.dumps({"event": "val", **entry}) + "\n")
        if self.csv is not None:
            for name, value in values.items():
                self.csv.writerow(["val", entry["epoch"], entry["step"], name, value])
        if self.tensorboard is not None:
            for name, value in values.items():
                self.tensorboard.add_scalar(f"val/{name}", value, entry["step"])

    def flush(self) -> None:
        for f in (self.json, self.csv_file):
            if f is not None:
                f.flush()
        if self.tensorboard is not None:
            self.tensorboard.flush()

    def close(self) -> None:
        for f in (self.json, self.csv_file):
            if f is not None:
                f.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        self.json = self.csv_file = self.csv = self.tensorboard = None
