"""Multi-process FSMTL (gloo, CPU; processes spawned here, each run bounded by a timeout).

One spawn per world size (a module fixture) runs everything a rank computes, to keep process
start-ups few; each concept is then its own test: the distributed top-K, identical ranks,
equivalence with one process, DataLoaders, resume, and the bytes of one step. Faults: a rank that
raises or hangs stops the others."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import fsmtl
import fsmtl_kernels as fk
from fsmtl.data import Split
from fsmtl.run.launcher import free_port, spawn
from fsmtl.strategies import FisherSparse, MaskSchedule
from fsmtl.tasks import Task
from fsmtl_kernels.distributed_topk_mask import distributed_topk_mask, distributed_topk_mask_batched, order_keys
from fsmtl_kernels.packed_mask import unpack_bits

SHAPES = [(7, 5), (123,), (1,), (33, 4)]
KS = [0, 1, 150, 0.5, 1.0]


def _full_scores(seed: int, num_tasks: int) -> list[torch.Tensor]:
    """Scores with many ties (few distinct values), -0.0 and +0.0, +inf, tiny values."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for shape in SHAPES:
        s = torch.randint(-3, 4, (num_tasks, *shape), generator=g).float()
        s[s == 3] = float("inf")
        s[s == -3] = -0.0
        s.view(num_tasks, -1)[:, ::11] = torch.randn(num_tasks, s[0].numel(), generator=g)[:, ::11] * 1e-30
        out.append(s)
    return out


def _slices(n: int, size: int) -> list[tuple[int, int]]:
    """Uneven dim-0 slices (FSDP2-like); the last rank may get nothing."""
    bounds = [0] + [min(n, (r + 1) * -(-n // size)) for r in range(size)]
    return [(bounds[r], bounds[r + 1]) for r in range(size)]


# ------------------------------------------------------------------- the Trainer on several ranks

TASKS = [Task("smile", "binary", 1), Task("age", "regression", 1), Task("digit", "multiclass", 3)]


def _split(n: int = 192) -> Split:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 6, generator=g)
    ys = [(x[:, 0] > 0).float(), x[:, 1] * 0.5, (x[:, 2] > 0).long() + (x[:, 3] > 0).long()]
    return Split([x] * 3, ys)


def _train(batch_size: int, epochs: int = 3, checkpoint_dir=None, trunk_extra=(), loader=None) -> dict:
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), *trunk_extra)
    model = fsmtl.MultiTaskModel(trunk, [nn.Linear(12, k) for k in (1, 1, 3)])
    strategy = FisherSparse(0.3, schedule=MaskSchedule(warmup=1, every=1), samples=64)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    trainer = fsmtl.Trainer(model, TASKS, strategy, opt, seed=3)
    if checkpoint_dir is not None:
        trainer.resume(checkpoint_dir)  # all ranks read what rank 0 wrote
        epochs -= trainer.epoch
    data = _split() if loader is None else _loader(loader, batch_size)
    history = trainer.fit(data, epochs=epochs, batch_size=batch_size, checkpoint_dir=checkpoint_dir,
                          checkpoint_every=1 if checkpoint_dir is not None else None)  # fmt: skip
    return {
        "loss": history["loss"],
        "params": [p.detach().clone() for p in model.parameters()],
        "mask": strategy.mask.words.clone(),
        "updates": len(history["mask_updates"]),
        "bytes": history.get("distributed", {}).get("bytes_per_step"),
    }


def _loader(kind: str, batch_size: int) -> DataLoader:
    """The split as a TensorDataset in a DataLoader without shuffling: ``"plain"`` (its batches
    are global batches, split across ranks) or ``"distributed"`` (a ``DistributedSampler``)."""
    split = _split()
    dataset = TensorDataset(split.inputs[0], *split.targets)
    if kind == "distributed":
        return DataLoader(dataset, batch_size=batch_size, sampler=DistributedSampler(dataset, shuffle=False))
    return DataLoader(dataset, batch_size=batch_size)


def _worker(rank: int, size: int, out: str, per_rank_batch: int) -> None:
    results = {}
    for seed in range(3):
        full = _full_scores(seed, len(KS))
        local = [s[:, slice(*_slices(s.shape[1], size)[rank])] for s in full]
        results[seed] = distributed_topk_mask_batched(local, KS).words
    flat = torch.cat([s[0].reshape(-1) for s in _full_scores(9, 1)])
    a, b = _slices(flat.numel(), size)[rank]
    results["one"] = distributed_topk_mask([flat[a:b]], 0.3).words  # the one-task API, one slice per rank
    results["train"] = _train(per_rank_batch)
    if size == 2:
        results["plain"] = _train(per_rank_batch * size, loader="plain")
        results["distributed"] = _train(per_rank_batch, loader="distributed")
    # Checkpoint after 2 epochs, then fresh models, optimizers and Trainers on every rank resume it.
    _train(per_rank_batch, epochs=2, checkpoint_dir=f"{out}/ckpt")
    torch.distributed.barrier()
    results["resumed"] = _train(per_rank_batch, epochs=3, checkpoint_dir=f"{out}/ckpt")
    results["ckpt_files"] = sorted(os.listdir(f"{out}/ckpt"))
    torch.save(results, f"{out}/rank{rank}.pt")


@pytest.fixture(scope="module", params=[(2, 32), (3, 21)], ids=["2ranks", "3ranks"])
def ranks(request, tmp_path_factory):
    """One spawn of ``size`` ranks per world size (process start-ups are the cost): what every rank
    computed, and the one-process run with the same global batch."""
    size, per_rank_batch = request.param
    out = tmp_path_factory.mktemp(f"ranks{size}")
    spawn(_worker, size, (str(out), per_rank_batch), timeout_s=80)
    parts = [torch.load(out / f"rank{r}.pt") for r in range(size)]
    return size, per_rank_batch, parts, _train(per_rank_batch * size)


def test_distributed_topk_union_is_topk_mask_bit_for_bit(ranks):
    """The union of the ranks' top-K masks over their shards is topk_mask's on the gathered scores."""
    size, _, parts, _ = ranks
    for seed in range(3):
        full = _full_scores(seed, len(KS))
        expected = fk.topk_mask_batched(full, KS).to_bool_stacked()
        for i in range(len(full)):
            got = []
            for r in range(size):
                numels = [(b - a) * t[0, 0].numel() if t.dim() > 2 else b - a for t in full
                          for a, b in [_slices(t.shape[1], size)[r]]]  # fmt: skip
                start = sum(-(-m // 32) for m in numels[:i])
                got.append(unpack_bits(parts[r][seed][:, start : start + -(-numels[i] // 32)], numels[i]))
            assert torch.equal(torch.cat(got, dim=1), expected[i].reshape(len(KS), -1)), (seed, i)
    flat = torch.cat([s[0].reshape(-1) for s in _full_scores(9, 1)])
    union = torch.cat([unpack_bits(parts[r]["one"], b - a)[0] for r, (a, b) in enumerate(_slices(flat.numel(), size))])
    assert torch.equal(union, fk.topk_mask([flat], 0.3).to_bool_stacked()[0][0])


def test_every_rank_holds_the_same_masks_and_parameters(ranks):
    _, _, parts, _ = ranks
    runs = [p["train"] for p in parts]
    for run in runs[1:]:
        assert torch.equal(run["mask"], runs[0]["mask"])
        for p, q in zip(run["params"], runs[0]["params"]):
            assert torch.equal(p, q)


def test_w_ranks_train_as_one_process_with_the_global_batch(ranks):
    """W ranks with per-rank batch B: the losses and parameters of one process with batch W*B
    (float tolerance: the all-reduce sums in another order), and the same masks up to the bits
    that ties in the summed Fisher scores may flip (at most 0.1%)."""
    _, _, parts, single = ranks
    dist_run = parts[0]["train"]
    assert dist_run["updates"] == single["updates"] == 2
    torch.testing.assert_close(torch.tensor(dist_run["loss"]), torch.tensor(single["loss"]), rtol=1e-5, atol=1e-7)
    for p, q in zip(dist_run["params"], single["params"]):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    a = unpack_bits(dist_run["mask"], dist_run["mask"].shape[1] * 32)
    b = unpack_bits(single["mask"], single["mask"].shape[1] * 32)
    assert (a == b).float().mean() >= 0.999


def test_dataloaders_plain_or_with_a_distributed_sampler_train_as_one_process(ranks):
    size, per_rank_batch, parts, _ = ranks
    if size != 2:
        pytest.skip("the DataLoader cases run on 2 ranks only")
    reference = _train(per_rank_batch * size, loader="plain")
    for kind in ("plain", "distributed"):
        for p, q in zip(parts[0][kind]["params"], reference["params"]):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        losses = torch.tensor(parts[0][kind]["loss"])
        torch.testing.assert_close(losses, torch.tensor(reference["loss"]), rtol=1e-5, atol=1e-7)


def test_a_checkpoint_of_w_ranks_resumes_on_fresh_ranks(ranks):
    """2 epochs, a checkpoint written by rank 0, fresh Trainers on every rank resume it for the third."""
    _, _, parts, _ = ranks
    resumed, dist_run = parts[0]["resumed"], parts[0]["train"]
    for p, q in zip(resumed["params"], dist_run["params"]):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert resumed["loss"] == dist_run["loss"] and torch.equal(resumed["mask"], dist_run["mask"])
    assert parts[0]["ckpt_files"] and all(f.startswith("ckpt-") for f in parts[0]["ckpt_files"])


def test_one_gradient_all_reduce_per_step(ranks):
    """Each step all-reduces the combined shared + head gradients once: 4 bytes per parameter, not T times."""
    _, _, parts, single = ranks
    assert parts[0]["train"]["bytes"] == 4 * sum(p.numel() for p in single["params"])


def test_single_process_equals_topk_mask():
    full = _full_scores(4, 3)
    ks = [5, 0.25, 200]
    assert torch.equal(distributed_topk_mask_batched(full, ks).words, fk.topk_mask_batched(full, ks).words)


def test_order_keys_preserve_float_order():
    x = torch.tensor([float("-inf"), -3.0, -1e-38, -0.0, 0.0, 1e-45, 2.0, float("inf")])
    keys = order_keys(x)
    assert keys[3] == keys[4]
    assert bool((keys[1:] >= keys[:-1]).all()) and bool((keys[1:4] > keys[:3]).all())


class _FailAt(nn.Module):
    """Identity that fails on rank 1 at its ``step``-th training forward: ``FSMTL_TEST_FAULT`` =
    ``raise`` (an exception), ``kill`` (SIGKILL, no clean-up) or ``hang`` (sleeps)."""

    def __init__(self, step: int) -> None:
        super().__init__()
        self.step, self.calls = step, 0

    def forward(self, x):
        if self.training and os.environ.get("RANK") == "1":
            self.calls += 1
            if self.calls == self.step:
                fault = os.environ["FSMTL_TEST_FAULT"]
                if fault == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                if fault == "hang":
                    time.sleep(300)
                raise RuntimeError("injected failure on rank 1")
        return x


def _fault_worker() -> None:
    """Run by the fault test in each rank's own ``python`` process (env: torchrun's variables)."""
    from fsmtl.run.launcher import init_from_env

    init_from_env("cpu")
    _train(32, trunk_extra=(_FailAt(5),))


def test_a_failed_rank_stops_the_others():
    """In two 2-rank groups run side by side, rank 1 raises or hangs mid-training; each rank 0,
    waiting in a collective, exits non-zero with gloo's error (the closed connection, or the 10 s
    process-group timeout) within 60 s of the start. (A killed rank closes its connections as one
    that raises: ``FSMTL_TEST_FAULT=kill`` runs that case by hand.)"""
    here = os.path.dirname(__file__)
    code = f"import sys; sys.path.insert(0, {here!r}); import test_distributed as t; t._fault_worker()"
    faults = ("raise", "hang")
    groups = {}
    start = time.monotonic()
    for fault in faults:
        port = free_port()
        groups[fault] = []
        for rank in range(2):
            ranks = {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_PORT": str(port)}
            env = dict(os.environ, **ranks, MASTER_ADDR="127.0.0.1", FSMTL_DIST_TIMEOUT="10", FSMTL_TEST_FAULT=fault)
            groups[fault].append(
                subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE, text=True)
            )
    errors, elapsed = {}, {}
    try:
        for fault in faults:
            errors[fault] = groups[fault][0].communicate(timeout=max(1.0, 60 - (time.monotonic() - start)))[1]
            elapsed[fault] = time.monotonic() - start
    finally:
        for procs in groups.values():
            for p in procs:
                if p.poll() is None:
                    p.kill()
    for fault in faults:
        rank0, rank1 = groups[fault]
        assert rank0.returncode not in (0, None), (fault, errors[fault][-2000:])
        assert elapsed[fault] < 60
        assert "Error" in errors[fault]  # gloo's error names the failed collective; not a silent exit
    assert "injected failure on rank 1" in groups["raise"][1].communicate(timeout=10)[1]
    # rank 0 was training (past the rendezvous) and failed in a collective, for the right reason
    assert "Connection closed by peer" in errors["raise"], errors["raise"][-2000:]
    assert "Timed out" in errors["hang"], errors["hang"][-2000:]
