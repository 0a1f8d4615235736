"""Checkpoints of a Trainer whose model is sharded with FSDP2 (``parallel="fsdp"``).

``directory/sharded-<global step>/`` holds the model's and optimizer's shards through
``torch.distributed.checkpoint`` (each rank writes its own shards; the layout is FQN-keyed, so the
files do not depend on the ranks' tensor ids), ``rank<r>.pt`` with the rest of each rank's Trainer
state (strategy and masks, RNG streams, counters, history, fingerprint), and ``complete``, written
by rank 0 after every rank finished: a folder without it (a run killed while saving) is ignored.
The newest ``keep_last`` complete folders are kept. Resuming needs the same world size (the
fingerprint records it) and continues bit for bit.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from ..files import atomic_write_bytes

PATTERN = re.compile(r"^sharded-(\d{9})$")
COMPLETE = "complete"


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def complete_folders(directory) -> list[Path]:
    """The complete checkpoint folders of ``directory``, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := PATTERN.match(p.name))]
    return [p for _, p in sorted(found) if (p / COMPLETE).is_file()]


def save(trainer, directory, *, keep_last: int = 3) -> Path:
    """Write the sharded checkpoint of ``trainer`` (a collective: call it on every rank)."""
    folder = Path(directory) / f"sharded-{trainer.global_step:09d}"
    model_state, optimizer_state = get_state_dict(trainer.model, trainer.optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(folder))
    rest = trainer.state_dict()
    rest.pop("model")
    rest.pop("optimizer")
    atomic_write_bytes(folder / f"rank{_rank()}.pt", lambda f: torch.save(rest, f))
    dist.barrier()
    if _rank() == 0:
        atomic_write_bytes(folder / COMPLETE, lambda f: f.write(b"ok\n"))
        for old in complete_folders(directory)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return folder


def resume(trainer, directory) -> bool:
    """Load the newest complete sharded checkpoint of ``directory`` into ``trainer``; False when
    there is none. Every rank reads its own shards and state."""
    folders = complete_folders(directory)
    if not folders:
        return False
    folder = folders[-1]
    path = folder / f"rank{_rank()}.pt"
    if not path.is_file():
        raise ValueError(f"{folder} has no {path.name}: it was written by a run of another world size")
    rest = torch.load(path, map_location="cpu", weights_only=False)
    model_state, optimizer_state = get_state_dict(trainer.model, trainer.optimizer)
    dcp.load({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(folder))
    set_state_dict(trainer.model, trainer.optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state)
    # The rest of the state is checked and applied as a whole, with the model and optimizer as loaded.
    trainer.load_state_dict({**rest, "model": trainer.model.state_dict(), "optimizer": trainer.optimizer.state_dict()})
    return True
