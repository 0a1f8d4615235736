"""FSMTL in a hand-written loop: the drop-in object's schedule, backward, state and errors; masks
and task models out; inputs-only prediction; what fit logs."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fsmtl
import fsmtl_kernels as fk
from fsmtl.data import Split
from fsmtl.tasks import task_loss

TASKS = [fsmtl.Task("smile", "binary", 1), fsmtl.Task("age", "regression", 1), fsmtl.Task("digit", "multiclass", 3)]


def model(seed=0):
    torch.manual_seed(seed)
    trunk = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU())
    return fsmtl.MultiTaskModel(trunk, [nn.Linear(16, t.num_outputs) for t in TASKS])


def data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    return x, [(x[:, 0] > 0).float(), x[:, 1] * 0.5, (x[:, 2] > 0).long() + (x[:, 3] > 0).long()]


def own_loop(net, fs, x, ys, epochs=5, start=0):
    """A plain multi-task loop; the FSMTL lines are marked."""
    loader = DataLoader(TensorDataset(x, *ys), batch_size=16, shuffle=False)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    updated = []
    for epoch in range(start, epochs):
        updated.append(fs.update_masks(epoch, loader))  # FSMTL
        for xb, *yb in loader:
            losses = [task_loss(task, net(xb, t), y) for t, (task, y) in enumerate(zip(TASKS, yb))]
            opt.zero_grad()
            fs.backward(losses)  # FSMTL (was: sum(losses).backward())
            opt.step()
    return updated


def test_the_schedule_updates_the_masks_on_its_epochs_and_the_backward_is_eq4():
    net = model()
    x, ys = data()
    fs = fsmtl.FSMTL(net, TASKS, keep_ratio=0.3, warmup=2, every=2, samples=32)
    assert fs.masks is None and fs.forward_mask(0) is None
    assert own_loop(net, fs, x, ys) == [False, False, True, False, True]
    assert [u["epoch"] for u in fs.updates] == [2, 4]
    assert fs.kept_fraction == pytest.approx([0.3] * 3, abs=1 / fs.masks.num_entries)
    # The backward is the masked average of Eq. 4: equal to the function the Trainer uses.
    xb, yb = x[:16], [y[:16] for y in ys]

    def losses():
        return [task_loss(task, net(xb, t), y) for t, (task, y) in enumerate(zip(TASKS, yb))]

    net.zero_grad(set_to_none=True)
    path = fs.backward(losses())
    ours = [p.grad.clone() for p in net.parameters()]
    net.zero_grad(set_to_none=True)
    fsmtl.masked_multitask_backward(losses(), net.masked_parameters(), fs.masks, head_params=net.head_parameters())
    assert path is not None and all(torch.equal(a, p.grad) for a, p in zip(ours, net.parameters()))


def test_the_own_loop_trains_as_the_trainer_does():
    """The same data order and the Fisher sampler's generator as the Trainer's FS strategy: the
    hand-written loop ends with the same parameters and masks, bit for bit."""
    x, ys = data()
    split = Split([x] * 3, ys)
    schedule = fsmtl.MaskSchedule(warmup=1, every=1)
    net = model()
    strategy = fsmtl.FisherSparse(0.3, samples=32, schedule=schedule, update="average")  # the loop's update
    trainer = fsmtl.Trainer(net, TASKS, strategy, torch.optim.SGD(net.parameters(), lr=0.1), seed=5)
    trainer.fit(split, epochs=3, batch_size=16, progress=None)

    own = model()
    fs = fsmtl.FSMTL(own, TASKS, 0.3, schedule=schedule, samples=32, generator=torch.Generator().manual_seed(6))
    opt = torch.optim.SGD(own.parameters(), lr=0.1)
    order = torch.Generator().manual_seed(5)  # the Trainer's data generator
    for epoch in range(3):
        idx = torch.randperm(64, generator=order)
        fs.update_masks(epoch, split)
        for b in range(4):
            i = idx[b * 16 : (b + 1) * 16]
            features = own.features(x[i])
            losses = [task_loss(task, h(features), y[i]).float() for task, h, y in zip(TASKS, own.heads, ys)]
            opt.zero_grad(set_to_none=True)
            fs.backward(losses)
            opt.step()
    assert fs.masks == strategy.mask
    assert all(torch.equal(a, b) for a, b in zip(own.parameters(), net.parameters()))


def test_state_dict_resumes_the_same_masks_and_sampler(tmp_path):
    x, ys = data()
    a, b = model(), model()
    fa = fsmtl.FSMTL(a, TASKS, 0.5, warmup=1, every=2, samples=16, seed=3)
    own_loop(a, fa, x, ys, epochs=2)
    torch.save({"model": a.state_dict(), "fsmtl": fa.state_dict()}, tmp_path / "ckpt.pt")
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    b.load_state_dict(state["model"])
    fb = fsmtl.FSMTL(b, TASKS, 0.5, warmup=1, every=2, samples=16, seed=99)
    fb.load_state_dict(state["fsmtl"])
    assert fb.masks == fa.masks and fb.updates == fa.updates
    assert torch.equal(fb.generator.get_state(), fa.generator.get_state())
    with pytest.raises(ValueError, match="not an FSMTL state"):
        fb.load_state_dict({"mask": None})


def test_misuse_is_named():
    net = model()
    x, ys = data()
    with pytest.raises(TypeError, match="MultiTaskModel"):
        fsmtl.FSMTL(nn.Linear(2, 2), TASKS, 0.5)
    with pytest.raises(ValueError, match="3 heads"):
        fsmtl.FSMTL(net, TASKS[:2], 0.5)
    with pytest.raises(ValueError, match="keep_ratio"):
        fsmtl.FSMTL(net, TASKS, 0.0)
    with pytest.warns(UserWarning, match=r"keep_ratio=3 is an int.*pass a float for a share \(e.g. 0.03"):
        fsmtl.FSMTL(net, TASKS, 3)
    fs = fsmtl.FSMTL(net, TASKS, 0.5, warmup=0)
    with pytest.raises(TypeError, match="epoch index"):
        fs.update_masks()
    with pytest.raises(ValueError, match="pass the data"):
        fs.update_masks(0)
    losses = [task_loss(task, net(x, t), y) for t, (task, y) in enumerate(zip(TASKS, ys))]
    with pytest.raises(TypeError, match="not one tensor"):
        fs.backward(sum(losses))
    with pytest.raises(ValueError, match="2 losses for 3 tasks"):
        fs.backward(losses[:2])
    step = fsmtl.FSMTL(net, TASKS, 0.5, unit="step", warmup=0, every=2)
    with pytest.raises(TypeError, match="step="):
        step.update_masks(0, Split([x] * 3, ys))
    assert step.update_masks(step=0, data=Split([x] * 3, ys)) and not step.update_masks(step=1, data=None)


def test_export_and_save_task_models_take_the_packed_mask(tmp_path):
    net = model()
    x, ys = data()
    masks = fsmtl.compute_masks(net, TASKS, [(x, y) for y in ys], 0.4)
    for t in range(3):
        exported = net.export_task(t, masks)
        with torch.no_grad():
            assert torch.equal(exported(x), net(x, t, masks.to_bool(t)))
    net.save_task_models(tmp_path, masks, names=[t.name for t in TASKS])
    sparsity = json.loads((tmp_path / "sparsity.json").read_text())
    for t, task in enumerate(TASKS):
        loaded = torch.load(tmp_path / f"{task.name}.pt", weights_only=False)
        assert isinstance(loaded, nn.Sequential)
        with torch.no_grad():
            assert torch.equal(loaded(x), net(x, t, masks.to_bool(t)))
        kept = int(masks.count()[t])
        assert sparsity[task.name]["mask_kept"] == kept == sparsity[task.name]["trunk_nonzero"]
        assert sparsity[task.name]["trunk_entries"] == sum(p.numel() for p in net.trunk.parameters())
    with pytest.raises(ValueError, match="mask covers 1 task"):
        net.export_task(0, masks.task(0))


def test_predict_without_targets():
    net = model()
    x, ys = data()
    trainer = fsmtl.Trainer(
        net, TASKS, fsmtl.FisherSparse(0.5, mask_forward=True), torch.optim.SGD(net.parameters(), 0.1)
    )
    trainer.fit(Split([x] * 3, ys), epochs=2, batch_size=16, progress=None)
    mask = trainer.strategy.mask
    outputs = trainer.predict(x, batch_size=7)
    with torch.no_grad():
        expected = [net(x, t, mask.to_bool(t)) for t in range(3)]
    for a, b in zip(outputs, expected):
        torch.testing.assert_close(a, b)
    assert [o.shape for o in trainer.predict(x, output="labels")] == [(64,), (64, 1), (64,)]
    probs = trainer.predict([x, x, x], output="probabilities")
    torch.testing.assert_close(probs[0], torch.sigmoid(expected[0][:, 0]))
    torch.testing.assert_close(probs[2].sum(1), torch.ones(64))
    assert torch.equal(trainer.predict(x, output="labels")[2], expected[2].argmax(1))
    with pytest.raises(ValueError, match="2 input tensors for 3 tasks"):
        trainer.predict([x, x])
    with pytest.raises(ValueError, match="output"):
        trainer.predict(x, output="logits")
    net.train()
    model_out = net.predict(x, [2, 0], mask=mask, batch_size=5)
    assert net.training  # restored after the eval-mode prediction
    torch.testing.assert_close(model_out[0], outputs[2])
    torch.testing.assert_close(model_out[1], outputs[0])
    dense = net.predict(x)
    with torch.no_grad():
        assert torch.equal(dense[1], net.heads[1](net.features(x)))


def test_fit_logs_steps_mask_updates_and_validation(tmp_path):
    net = model()
    x, ys = data()
    split = Split([x] * 3, ys)
    strategy = fsmtl.FisherSparse(0.5, samples=16, schedule=fsmtl.MaskSchedule(1, 1))
    trainer = fsmtl.Trainer(net, TASKS, strategy, torch.optim.SGD(net.parameters(), 0.1))
    pytest.importorskip("tensorboard", reason="tensorboard is not installed")
    trainer.fit(split, epochs=2, batch_size=16, val=split, log_path=tmp_path / "log.jsonl",
                csv_path=tmp_path / "log.csv", tensorboard_dir=tmp_path / "tb", progress=None)  # fmt: skip
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["event"] for r in records] == ["step"] * 4 + ["val"] + ["mask_update"] + ["step"] * 4 + ["val"]
    update = records[5]
    assert update["kept/smile"] == pytest.approx(0.5, abs=1e-3) and "overlap/mean" in update
    rows = list(csv.reader((tmp_path / "log.csv").open()))
    assert rows[0] == ["event", "epoch", "step", "name", "value"]
    assert sum(r[0] == "step" for r in rows) == 8 * 3 and any(r[3] == "score" for r in rows)
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_fit_shows_plain_progress_lines_by_default(capsys):
    net = model()
    x, ys = data()
    trainer = fsmtl.Trainer(net, TASKS, fsmtl.EqualWeighting(), torch.optim.SGD(net.parameters(), 0.1))
    trainer.fit(Split([x] * 3, ys), epochs=2, batch_size=16)
    assert "fit: done, 8/8 steps in" in capsys.readouterr().err  # not a terminal here: plain lines
    trainer.fit(Split([x] * 3, ys), epochs=1, batch_size=16, progress=None)
    assert capsys.readouterr().err == ""


def test_packed_mask_saved_and_loaded_through_fsmtl(tmp_path):
    net = model()
    x, ys = data()
    fs = fsmtl.FSMTL(net, TASKS, 0.5, warmup=0, samples=16)
    fs.update_masks(0, Split([x] * 3, ys))
    fs.masks.save(tmp_path / "masks.pt")
    other = fsmtl.FSMTL(model(1), TASKS, 0.5)
    other.set_masks(fk.PackedMask.load(tmp_path / "masks.pt"))
    assert other.masks == fs.masks
