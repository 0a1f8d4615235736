"""Multi-process FSMTL (gloo, CPU; processes spawned here, each run bounded by a timeout).

One spawn per world size (a module fixture) runs everything a rank computes, to keep process
start-ups few; each concept is then its own test: the distributed top-K, identical ranks,
equivalence with one process (masks bit for bit but at near-ties, whose rule is tested), DataLoaders,
resume, and the bytes of one step. Faults of ``fsmtl run`` under torchrun: a rank that hangs, is
killed, raises or sees a non-finite loss ends the whole job, every living rank printing one line
that names the failing rank and the reason; a resume on another number of processes is refused."""

from __future__ import annotations

import contextlib
import os
import re
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


@contextlib.contextmanager
def _scores_of_mask_updates():
    """The Fisher scores (``[T, n]`` per masked parameter) every mask update takes its top-K of."""
    captured, real = [], fk.topk_mask_batched

    def capture(scores, k):
        captured.append([s.detach().clone() for s in scores])
        return real(scores, k)

    fk.topk_mask_batched = capture
    try:
        yield captured
    finally:
        fk.topk_mask_batched = real


def _worker(rank: int, size: int, out: str, per_rank_batch: int) -> None:
    results = {}
    for seed in range(3):
        full = _full_scores(seed, len(KS))
        local = [s[:, slice(*_slices(s.shape[1], size)[rank])] for s in full]
        results[seed] = distributed_topk_mask_batched(local, KS).words
    flat = torch.cat([s[0].reshape(-1) for s in _full_scores(9, 1)])
    a, b = _slices(flat.numel(), size)[rank]
    results["one"] = distributed_topk_mask([flat[a:b]], 0.3).words  # the one-task API, one slice per rank
    with _scores_of_mask_updates() as scores:
        results["train"] = _train(per_rank_batch)
    results["train"]["scores"] = scores
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
    with _scores_of_mask_updates() as scores:
        single = _train(per_rank_batch * size)
    single["scores"] = scores
    return size, per_rank_batch, parts, single


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
    (float tolerance: the all-reduce adds the ranks' partial sums in another order)."""
    _, _, parts, single = ranks
    dist_run = parts[0]["train"]
    assert dist_run["updates"] == single["updates"] == 2
    torch.testing.assert_close(torch.tensor(dist_run["loss"]), torch.tensor(single["loss"]), rtol=1e-5, atol=1e-7)
    for p, q in zip(dist_run["params"], single["params"]):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_w_rank_masks_are_the_one_process_masks_but_at_near_ties(ranks):
    """The masks of W ranks equal one process's bit for bit, except where the one-process Fisher
    score of an entry lies within the scores' float difference of its task's k-th largest (a
    near-tie). The W ranks' scores differ from one process's in their last bits only (at most 1e-4
    relative; about 1e-6 here), since their gradients and Fisher sums add the ranks' partial sums in
    another order. This run's masks are identical; its tightest gap at a threshold (about 1e-5 on
    3 ranks) is close to the scores' difference, so another seed may flip such a pair."""
    _, _, parts, single = ranks
    w_scores, one_scores = parts[0]["train"]["scores"], single["scores"]
    assert len(w_scores) == len(one_scores) == 2
    for update, (w_params, one_params) in enumerate(zip(w_scores, one_scores)):
        w = torch.cat([s.reshape(s.shape[0], -1) for s in w_params], 1)
        one = torch.cat([s.reshape(s.shape[0], -1) for s in one_params], 1)
        w_masks = fk.topk_mask_batched(w_params, 0.3).to_bool_stacked()
        one_masks = fk.topk_mask_batched(one_params, 0.3).to_bool_stacked()
        w_mask = torch.cat([m.reshape(m.shape[0], -1) for m in w_masks], 1)
        one_mask = torch.cat([m.reshape(m.shape[0], -1) for m in one_masks], 1)
        for t in range(one.shape[0]):
            delta = float(((w[t] - one[t]).abs() / one[t].abs().clamp_min(1e-30)).max())
            assert delta <= 1e-4, (update, t, delta)
            k = int(one_mask[t].sum())
            threshold = float(torch.sort(one[t], descending=True).values[k - 1])
            differ = (w_mask[t] != one_mask[t]).nonzero().flatten()
            gaps = (one[t][differ] - threshold).abs() / abs(threshold)
            assert bool((gaps <= 2 * delta + 1e-12).all()), (update, t, gaps.tolist(), delta)
    assert torch.equal(parts[0]["train"]["mask"], single["mask"])  # no near-tie flipped in this run


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


FAULTS = os.path.join(os.path.dirname(__file__), "faults")  # sitecustomize.py: FSMTL_FAULT injection
# Two runs (MTL, then FS), 6 global steps per epoch of 2 epochs: the MTL run is finished (its
# result kept) before the fault at rank 1's 14th step, the FS run's 2nd.
RUN = [
    "run", "--benchmark", "synthetic", "-o", "n_samples=120", "-o", "n_tasks=2", "--methods", "mtl,fs",
    "--seeds", "0", "--keep-ratios", "0.5", "--epochs", "2", "--warmup", "1", "--samples", "8", "--hidden", "8",
    "--batch-size", "8", "--no-progress",
]  # fmt: skip
TIMEOUT_S = 8  # the collectives' timeout in these jobs (30 s by default)


def _job(fault: str, tmp, *, launcher: bool, extra: tuple[str, ...] = ()) -> list[subprocess.Popen]:
    """``fsmtl run`` on 2 ranks with ``fault`` on rank 1: through ``--nproc 2`` (torch's elastic
    launcher, one process) or as two processes with torchrun's environment (rank 0 hosts the store);
    ``extra``: more options (``--parallel fsdp``)."""
    out = tmp / fault
    args = [*RUN, *extra, "--out", str(out / "out"), "--checkpoint-dir", str(out / "ck")]
    env = dict(os.environ, OMP_NUM_THREADS="1", FSMTL_DIST_TIMEOUT=str(TIMEOUT_S), FSMTL_FAULT=f"rank:1:14:{fault}",
               FSMTL_FAULT_MARK=str(tmp / f"{fault}.fired"),
               PYTHONPATH=os.pathsep.join([FAULTS, os.environ.get("PYTHONPATH", "")]))  # fmt: skip
    command = [sys.executable, "-m", "fsmtl", *args]
    if launcher:
        return [subprocess.Popen([*command, "--nproc", "2"], env=env, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True)]  # fmt: skip
    port = str(free_port())
    procs = []
    for rank in range(2):
        ranks = {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_PORT": port}
        procs.append(subprocess.Popen(command, env=dict(env, **ranks, MASTER_ADDR="127.0.0.1"),
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))  # fmt: skip
    return procs


def _faulty_jobs(jobs: dict[str, bool], tmp, extra: tuple[str, ...] = ()):
    """Start every job of ``jobs`` (fault -> through ``--nproc 2``) at once and wait, at most 170 s,
    for all to end; returns the processes, each job's stderr per process and when each job ended
    (a job still running then is killed and has no end time)."""
    procs = {fault: _job(fault, tmp, launcher=launcher, extra=extra) for fault, launcher in jobs.items()}
    ended = {}
    deadline = time.monotonic() + 170
    try:
        while len(ended) < len(procs) and time.monotonic() < deadline:
            for fault, group in procs.items():
                if fault not in ended and all(p.poll() is not None for p in group):
                    ended[fault] = time.time()
            time.sleep(0.2)
        errors = {fault: [p.communicate(timeout=5)[1] for p in group] for fault, group in procs.items()}
    finally:
        for group in procs.values():
            for p in group:
                if p.poll() is None:
                    p.kill()
    return procs, errors, ended


def _check_the_job_ended(fault: str, group, errors: list[str], ended: dict, tmp, reason: str) -> None:
    """Every process of the job exited non-zero within the collective timeout plus seconds of the
    fault; each living rank printed one ``fsmtl: error:`` line with ``reason`` and no traceback;
    the MTL run that finished before the fault kept its result in the checkpoint directory."""
    assert all(p.returncode != 0 for p in group), (fault, errors)
    mark = tmp / f"{fault}.fired"
    assert mark.exists(), (fault, errors)
    assert fault in ended, (fault, "still running after 170 s", errors)
    assert ended[fault] - mark.stat().st_mtime < TIMEOUT_S + 20, (fault, ended[fault] - mark.stat().st_mtime)
    lines = [line for err in errors for line in _error_lines(err)]
    living = {"[rank 0/2]"} if fault == "kill" else {"[rank 0/2]", "[rank 1/2]"}
    assert {re.search(r"\[rank \d/2\]", line).group() for line in lines} == living, (fault, lines)
    assert len(lines) == len(living), (fault, lines)
    assert all(reason in line for line in lines), (fault, lines)
    assert all("Traceback" not in err for err in errors), (fault, errors)
    assert len(list((tmp / fault / "ck").glob("runs/*/result.pt"))) == 1, fault


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "fsmtl: error:" in line and "[rank" in line]


def test_a_failing_rank_ends_the_whole_job_with_one_line_per_rank(tmp_path, capsys):
    """Under torchrun, rank 1 hangs, is killed (kill -9), raises, or sees a NaN loss at its 14th
    step; the whole job ends (every process exits non-zero) within the collective timeout plus a
    few seconds of the fault, far within 60 s; every rank still alive prints one ``fsmtl: error:``
    line naming rank 1 and the reason; the finished run's result is kept. A resume of that
    2-process run on one process is refused before training, naming both process counts."""
    jobs = {"hang": True, "kill": False, "raise": False, "nan": False}  # True: through --nproc 2
    procs, errors, ended = _faulty_jobs(jobs, tmp_path)
    reasons = {
        "hang": "rank 1 is hung",
        "kill": "rank 1 stopped responding (killed",
        "raise": "rank 1 failed: RuntimeError: injected failure on rank 1",
        "nan": "rank 1 failed: FloatingPointError: non-finite loss nan",
    }
    for fault in procs:
        _check_the_job_ended(fault, procs[fault], errors[fault], ended, tmp_path, reasons[fault])
    from fsmtl.run.cli import main

    capsys.readouterr()
    assert main(["run", "--resume", str(tmp_path / "hang" / "ck"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fsmtl: error:") and len(err.splitlines()) == 1, err
    assert "trained on 2 process(es)" in err and "this one runs on 1" in err and "--nproc 2" in err, err


def test_a_hung_or_killed_rank_ends_a_sharded_job(tmp_path):
    """The same faults under ``--parallel fsdp`` (FSDP2; FS in turns): rank 1 hangs (through
    ``--nproc 2``) or is killed (two processes) at its 14th step; the whole job ends within the
    collective timeout plus a few seconds of the fault, every living rank says why in one line, and
    the MTL run finished before the fault is kept."""
    procs, errors, ended = _faulty_jobs({"hang": True, "kill": False}, tmp_path, extra=("--parallel", "fsdp"))
    reasons = {"hang": "rank 1 is hung", "kill": "rank 1 stopped responding (killed"}
    for fault in procs:
        _check_the_job_ended(fault, procs[fault], errors[fault], ended, tmp_path, reasons[fault])
