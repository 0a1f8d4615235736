"""FSMTL on FSDP2 (``fully_shard``), 2 and 3 gloo ranks spawned here with a timeout: masks equal on
every rank and to one process's, parameters equal to one process's within float tolerance, one
reduce-scatter per FSDP group per step (as plain FSDP2), a sharded checkpoint resumed bit for bit,
a full per-task sparse model exported, the in-turns update (FS's default) on shards, and what cannot
run on shards refused before training."""

from __future__ import annotations

import collections

import pytest
import torch
import torch.distributed as dist
from torch import nn

import fsmtl
from fsmtl.data import Split
from fsmtl.run.launcher import spawn
from fsmtl.strategies import get_method

TASKS = [fsmtl.Task("smile", "binary", 1), fsmtl.Task("age", "regression", 1), fsmtl.Task("digit", "multiclass", 3)]
EPOCHS, BATCH = 3, 16  # per rank; one process trains with BATCH * world size


def split(n=96):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 6, generator=g)
    return Split([x] * 3, [(x[:, 0] > 0).float(), x[:, 1] * 0.5, (x[:, 2] > 0).long() + (x[:, 3] > 0).long()])


def model(shard: bool) -> fsmtl.MultiTaskModel:
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU())
    net = fsmtl.MultiTaskModel(trunk, [nn.Linear(12, k) for k in (1, 1, 3)])
    return net.shard() if shard else net


def trainer(shard: bool, method: str = "fs-avg") -> fsmtl.Trainer:
    net = model(shard)
    options = fsmtl.strategies.MethodOptions(keep_ratio=0.3, samples=64, schedule=fsmtl.MaskSchedule(0, 1))
    strategy = get_method(method).build(options)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    return fsmtl.Trainer(net, TASKS, strategy, optimizer, seed=3, parallel="fsdp" if shard else None)


def counting(calls: collections.Counter):
    """Count FSDP's collectives: its default reduce-scatter and all-gather call these public functions."""
    for name in ("reduce_scatter_single", "all_gather_single"):
        original = getattr(dist, name)

        def spy(*args, _original=original, _name=name, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        setattr(dist, name, spy)


def refusals() -> list[str]:
    """The one-line reasons a sharded run gives before training."""

    def unsharded():
        net = model(False)
        fsmtl.Trainer(net, TASKS, fsmtl.FisherSparse(0.3, update="average"), torch.optim.SGD(net.parameters(), 0.1),
                      parallel="fsdp")  # fmt: skip

    def optimizer_before_shard():
        net = model(False)
        optimizer = torch.optim.SGD(net.parameters(), 0.1)  # holds the unsharded parameters
        fsmtl.Trainer(net.shard(), TASKS, fsmtl.FisherSparse(0.3, update="average"), optimizer, parallel="fsdp")

    cases = [
        unsharded,
        optimizer_before_shard,
        lambda: trainer_with(get_method("gradnorm").build()),
        lambda: trainer_with(fsmtl.FisherSparse(0.3, mask_forward=True, update="average")),
        lambda: trainer_with(fsmtl.FisherSparse(0.3, update="average"), amp="bf16"),
        lambda: trainer_with(fsmtl.FisherSparse(0.3, update="average"), homogeneous=False),
        lambda: trainer_with(fsmtl.FisherSparse(0.3)),  # in turns: runs on shards
    ]
    messages = []
    for case in cases:
        try:
            case()
            messages.append("no error")
        except ValueError as exc:
            messages.append(str(exc))
    return messages


def trainer_with(strategy, **kwargs):
    net = model(True)
    return fsmtl.Trainer(net, TASKS, strategy, torch.optim.SGD(net.parameters(), 0.1), parallel="fsdp", **kwargs)


def _worker(rank: int, size: int, out: str) -> None:
    calls = collections.Counter()
    counting(calls)
    results = {}
    for method in ("fs-avg", "mtl", "fs", "mtl-turns"):
        calls.clear()
        run = trainer(True, method)
        run.fit(split(), epochs=EPOCHS, batch_size=BATCH, progress=None)
        results[method] = {
            "reduce_scatters": calls["reduce_scatter_single"],
            "steps": run.global_step,
            "mask": run.strategy.mask.words.clone() if run.strategy.mask is not None else None,
            "updates": [u["ones"] for u in run.history["mask_updates"]],
            "params": [p.detach().clone() for p in run.model.full_copy().parameters()],
        }
    run_fs = trainer(True)
    run_fs.fit(split(), epochs=EPOCHS - 1, batch_size=BATCH, checkpoint_dir=f"{out}/ckpt", checkpoint_every=1,
               progress=None)  # fmt: skip
    resumed = trainer(True)
    assert resumed.resume(f"{out}/ckpt") and resumed.epoch == EPOCHS - 1
    resumed.fit(split(), epochs=1, batch_size=BATCH, progress=None)
    results["resumed"] = {
        "mask": resumed.strategy.mask.words.clone(),
        "params": [p.detach().clone() for p in resumed.model.full_copy().parameters()],
        "loss": resumed.history["loss"],
    }
    exported = resumed.strategy.fsmtl.export_task(1)
    results["export"] = {"type": type(exported).__name__, "nonzero": fsmtl.count_nonzero_shared(exported)}
    results["groups"] = len(run_fs.model.fsdp_units()) + 1
    results["refusals"] = refusals()
    torch.save(results, f"{out}/rank{rank}.pt")


@pytest.fixture(scope="module", params=[2, 3], ids=["2ranks", "3ranks"])
def ranks(request, tmp_path_factory):
    size = request.param
    out = tmp_path_factory.mktemp(f"fsdp{size}")
    spawn(_worker, size, (str(out),), timeout_s=150)
    parts = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(size)]
    single = trainer(False)
    single.fit(split(), epochs=EPOCHS, batch_size=BATCH * size, progress=None)
    return size, parts, single


@pytest.fixture(scope="module")
def in_turns_single(ranks):
    """One process's in-turns runs (FS by default, MTL-turns) with the global batch of ``ranks``."""
    size = ranks[0]
    out = {}
    for method in ("fs", "mtl-turns"):
        out[method] = trainer(False, method)
        out[method].fit(split(), epochs=EPOCHS, batch_size=BATCH * size, progress=None)
    return out


def test_masks_are_equal_on_every_rank_and_to_one_process(ranks):
    size, parts, single = ranks
    for part in parts:
        assert torch.equal(part["fs-avg"]["mask"], single.strategy.mask.words)
        assert part["fs-avg"]["updates"] == [u["ones"] for u in single.history["mask_updates"]]


def test_parameters_follow_one_process_with_the_global_batch(ranks):
    size, parts, single = ranks
    for part in parts:
        for a, b in zip(part["fs-avg"]["params"], single.model.parameters(), strict=True):
            torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["fs", "mtl-turns"])
def test_in_turns_updates_on_shards_follow_one_process(ranks, in_turns_single, method):
    """FS's default update on homogeneous tasks (in turns: one masked update per task) and its dense
    counterpart, on shards: the same masks as one process, parameters within float tolerance, and
    the reduce-scatters of one plain FSDP2 backward per task update."""
    size, parts, _ = ranks
    single = in_turns_single[method]
    assert single.strategy.in_turns
    for part in parts:
        run = part[method]
        if method == "fs":
            assert torch.equal(run["mask"], single.strategy.mask.words)
        for a, b in zip(run["params"], single.model.parameters(), strict=True):
            torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6)
        # Each task's update is one plain FSDP2 backward of its loss: the dense in-turns run's count,
        # the same for every task update of every step.
        assert run["reduce_scatters"] == part["mtl-turns"]["reduce_scatters"]
        assert run["reduce_scatters"] % (run["steps"] * len(TASKS)) == 0
    changed = [not torch.equal(a, b) for a, b in zip(parts[0][method]["params"], model(False).parameters())]
    assert all(changed)  # every parameter trained (each head in its own turn)


def test_one_reduce_scatter_per_fsdp_group_per_step_as_plain_fsdp(ranks):
    _, parts, _ = ranks
    fs, mtl = parts[0]["fs-avg"], parts[0]["mtl"]
    assert fs["steps"] == mtl["steps"] and fs["reduce_scatters"] == mtl["reduce_scatters"]
    assert fs["reduce_scatters"] == fs["steps"] * (parts[0]["groups"] - 1)  # the root holds no parameter


def test_a_sharded_checkpoint_resumes_bit_for_bit(ranks):
    _, parts, _ = ranks
    for part in parts:
        assert torch.equal(part["resumed"]["mask"], part["fs-avg"]["mask"])
        for a, b in zip(part["resumed"]["params"], part["fs-avg"]["params"], strict=True):
            assert torch.equal(a, b)


def test_export_gives_a_full_sparse_task_model(ranks):
    _, parts, single = ranks
    export = parts[0]["export"]
    kept = int(single.strategy.mask.count()[1])
    dense_entries = sum(p.numel() for p in single.model.dense_shared_parameters())
    assert export["type"] == "Sequential" and export["nonzero"] <= kept + dense_entries


def test_what_cannot_run_on_shards_is_refused_before_training(ranks):
    _, parts, _ = ranks
    messages = parts[0]["refusals"]
    assert "needs a sharded model: call model.shard() before building the optimizer" in messages[0]
    assert "not the sharded model's parameters: build it after model.shard()" in messages[1]
    assert "GradNorm combines each task's full gradient" in messages[2]
    assert "mask_forward" in messages[3]
    assert "mp_policy" in messages[4]
    assert "homogeneous" in messages[5]
    assert messages[6] == "no error"


def test_fsmtl_run_parallel_fsdp_trains_on_two_processes_and_refuses_what_cannot_run(tmp_path):
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    base = [sys.executable, "-m", "fsmtl", "run", "--parallel", "fsdp", "--seeds", "0", "--epochs", "2",
            "--keep-ratios", "0.5", "--warmup", "1", "--update-every", "1", "--no-progress"]  # fmt: skip
    alone = subprocess.run([*base, "--methods", "mtl", "--out", str(tmp_path / "a")], env=env, capture_output=True,
                           text=True, timeout=120)  # fmt: skip
    assert alone.returncode == 2 and "add --nproc N" in alone.stderr.strip().splitlines()[-1]
    done = subprocess.run([*base, "--nproc", "2", "--methods", "mtl,fs", "--out", str(tmp_path / "b")], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((tmp_path / "b" / "results.json").read_text())
    assert results["parallel"] == "fsdp" and results["distributed"]["world_size"] == 2
    assert results["methods"]["fs"]["mask_used"]  # FS in turns, its default here
