"""SE, task routing and maximum roaming: per-task modulation of the trunk's activations (the
architectures of the composed methods, here with equal weights as the plain ``se``/``tr``/``mr``)."""

import pytest
import torch
from torch import nn

import fsmtl
import fsmtl_kernels
from fsmtl.data import Split
from fsmtl.models import cnn_trunk
from fsmtl.strategies import METHODS, Composed, EqualWeighting, TrainingContext
from fsmtl.strategies.architecture.base import modulation_points
from fsmtl.strategies.architecture.roaming import MaximumRoaming, covering_unit_masks
from fsmtl.strategies.architecture.routing import TaskRouting
from fsmtl.strategies.architecture.se import TaskSqueezeExcitation
from fsmtl.tasks import Task
from fsmtl.tasks.losses import task_loss

TASKS = [Task("a", "binary", 1), Task("b", "binary", 1), Task("c", "multiclass", 3)]


def cnn_model(seed=0, hidden=10):
    torch.manual_seed(seed)
    return fsmtl.MultiTaskModel(cnn_trunk(3, hidden=hidden), [nn.Linear(hidden, t.num_outputs) for t in TASKS])


def data(n=24, seed=0, size=8):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g)
    ys = [
        (x[:, 0].mean((1, 2)) > 0).float(),
        (x[:, 1].mean((1, 2)) > 0).float(),
        torch.randint(0, 3, (n,), generator=g),
    ]
    return Split([x] * 3, ys)


def context(model, split, seed=0):
    def sample(t, n):
        return split.inputs[t][:n], split.targets[t][:n]

    return TrainingContext(model, TASKS, sample, torch.Generator().manual_seed(seed))


def equal(architecture):
    """The architecture with equal weights: what the plain method name builds."""
    return Composed(architecture, EqualWeighting())


def fit(strategy, model, split, epochs=1):
    if not isinstance(strategy, Composed):
        strategy = equal(strategy)
    trainer = fsmtl.Trainer(model, TASKS, strategy, torch.optim.Adam(model.parameters(), 1e-2))
    trainer.fit(split, epochs=epochs, batch_size=8)
    return trainer


def point_outputs(model, x, task):
    """The outputs of the trunk's modulation points (after the strategy's hooks) in task's forward."""
    found = []
    modules = dict(model.trunk.named_modules())
    hooks = [modules[p].register_forward_hook(lambda m, i, o: found.append(o)) for p in modulation_points(model.trunk)]
    try:
        model.eval()
        with torch.no_grad():
            model(x, task)
    finally:
        for h in hooks:
            h.remove()
    return found


def test_default_points_are_the_activations_of_the_cnn():
    assert modulation_points(cnn_model().trunk) == ["2", "6"]


@pytest.mark.parametrize("keep_ratio, kept", [(0.5, (16, 5)), (0.3, (10, 3)), (1.0, (32, 10))])
def test_task_routing_masks_are_fixed_with_the_keep_ratio_per_layer(keep_ratio, kept):
    model, split = cnn_model(), data()
    tr = TaskRouting(keep_ratio)
    fit(tr, model, split)
    assert [m.shape for m in tr.masks] == [(3, 32), (3, 10)]
    for m, k in zip(tr.masks, kept):
        assert m.sum(1).tolist() == [k] * 3
    before = [m.clone() for m in tr.masks]
    fit(tr, model, split)  # a second fit keeps the masks (drawn once)
    assert all(torch.equal(a, b) for a, b in zip(before, tr.masks))
    if keep_ratio < 1:
        assert not torch.equal(tr.masks[0][0], tr.masks[0][1])  # tasks route differently
    # Task t's activations are zero exactly outside its mask.
    x = split.inputs[0][:4]
    for t in range(3):
        for out, m in zip(point_outputs(model, x, t), tr.masks):
            assert (out[:, ~m[t]] == 0).all()
            assert (out[:, m[t]] != 0).any()


def test_task_routing_trains_shared_weights_densely():
    model, split = cnn_model(), data()
    tr = equal(TaskRouting(0.5))
    tr.bind(context(model, split))
    x, ys = split.inputs[0][:8], [y[:8] for y in split.targets]
    losses = [task_loss(task, model(x, t), y[:8]) for t, (task, y) in enumerate(zip(TASKS, ys))]
    per_task = [torch.autograd.grad(v, model.shared_parameters(), retain_graph=True) for v in losses]
    tr.backward(losses)
    for i, p in enumerate(model.shared_parameters()):
        torch.testing.assert_close(p.grad, sum(g[i] for g in per_task) / 3)


def test_maximum_roaming_covering_initialisation_gives_every_unit_a_task():
    """The authors' start: unit j to task j mod T, then random units up to the keep ratio."""
    for channels, ratio in ((10, 0.3), (32, 0.5), (7, 0.2), (123, 0.9)):
        masks = covering_unit_masks(channels, 3, ratio, torch.Generator().manual_seed(0))
        k = fsmtl_kernels.resolve_k(ratio, channels, "keep_ratio")
        assert masks.any(0).all()  # every unit covered by some task
        assert all(masks[j % 3, j] for j in range(channels))
        assert (masks.sum(1) == torch.clamp(torch.tensor([len(range(t, channels, 3)) for t in range(3)]), min=k)).all()
    # 7 units, 3 tasks, keep 0.2 (k = 1): the covering alone gives 3, 2 and 2 units.
    assert covering_unit_masks(7, 3, 0.2, torch.Generator()).sum(1).tolist() == [3, 2, 2]


def test_maximum_roaming_swaps_one_unit_visits_every_unit_then_freezes():
    model, split = cnn_model(hidden=10), data()
    mr = MaximumRoaming(0.3, every=1)
    mr.bind(context(model, split))
    assert mr.free_units() == [32 - 10, 10 - 3]  # k = 10 of 32, 3 of 10 (the covering gives task 0 four)
    history = [[m.clone() for m in mr.masks]]
    for _ in range(25):
        mr.roam()
        history.append([m.clone() for m in mr.masks])
    for n, (before, after) in enumerate(zip(history, history[1:])):
        for a, b in zip(before, after):
            assert (a.sum(1) == b.sum(1)).all()  # the number of active units never changes
            holds = a.sum(1)
            swaps = (a ^ b).sum(1)
            # one unit out, one in, per task, until it has visited all units; then frozen
            assert (swaps == torch.where(n < a.shape[1] - holds, 2, 0)).all()
    # 10 channels: task 0 holds 4 and has visited all after 6 updates, tasks 1 and 2 after 7.
    assert all(torch.stack([h[1][t] for h in history[: 11 - k]]).any(0).all() for t, k in enumerate((4, 3, 3)))
    assert mr.frozen and mr.updates == 25
    assert not mr.updates_at(5, 100, True)


def test_maximum_roaming_updates_every_k_steps_in_training():
    model, split = cnn_model(), data(n=32)
    mr = MaximumRoaming(0.5, every=2)
    fit(mr, model, split, epochs=2)  # 8 steps: updates before steps 2, 4, 6
    assert mr.updates == 3
    with pytest.raises(ValueError, match="every"):
        MaximumRoaming(0.5, every=0)


def test_maximum_roaming_on_the_run_schedule_visits_every_unit_within_one_period():
    """What `fsmtl run --warmup 1 --update-every 1` builds: roaming starts after the warm-up
    epoch, at the pace that visits every unit within one epoch, then the masks freeze."""
    from fsmtl.strategies import MaskSchedule
    from fsmtl.strategies.method import MethodOptions

    model, split = cnn_model(hidden=4), data(n=64)
    mr = METHODS["mr"].build(MethodOptions(keep_ratio=0.75, schedule=MaskSchedule(warmup=1, every=1)))
    trainer = fit(mr, model, split, epochs=3)  # 8 steps per epoch
    roaming = mr.architecture
    assert roaming.free_units() == [32 - 24, 4 - 3] and roaming.every == 8 // 8
    assert roaming.frozen and roaming.updates == 8  # steps 8..15, then frozen in the third epoch
    assert all(v.all() for v in roaming.visited)
    assert trainer.history["mask_updates"] is not None
    with pytest.raises(TypeError, match="schedule"):
        MaximumRoaming(0.5, schedule=2)


def test_se_parameters_are_per_task_and_trained_by_their_task_only():
    model, split = cnn_model(), data()
    se = TaskSqueezeExcitation()
    strategy = equal(se)
    strategy.bind(context(model, split))
    assert len(se.se_modules) == 3 and [m.fc1.in_features for m in se.se_modules[0]] == [32, 10]
    owned = [list(m.parameters()) for m in se.se_modules]
    assert not set(map(id, owned[0])) & set(map(id, owned[1]))
    assert not set(map(id, owned[0])) & set(map(id, model.parameters()))
    x, ys = split.inputs[0][:8], [y[:8] for y in split.targets]
    losses = [task_loss(task, model(x, t), y) for t, (task, y) in enumerate(zip(TASKS, ys))]
    own = torch.autograd.grad(losses[0], owned[0], retain_graph=True)
    other = torch.autograd.grad(losses[1], owned[0], retain_graph=True, allow_unused=True)
    assert all(g is None for g in other)
    per_task = [torch.autograd.grad(v, model.shared_parameters(), retain_graph=True) for v in losses]
    strategy.backward(losses)
    for p, g in zip(owned[0], own):
        torch.testing.assert_close(p.grad, g)
    for i, p in enumerate(model.shared_parameters()):  # shared weights: dense task average
        torch.testing.assert_close(p.grad, sum(g[i] for g in per_task) / 3)
    params = list(se.se_modules.parameters())
    before = [p.detach().clone() for p in params]
    moved = [bool((p.grad != 0).any()) for p in params]
    assert sum(moved) > len(params) // 2
    strategy.before_optimizer_step()
    strategy.after_optimizer_step()  # the architecture's own optimizer steps the SE parameters
    assert [not torch.equal(a, b) for a, b in zip(before, params)] == moved
    assert all(p.grad is None for p in params)


@pytest.mark.parametrize("name", ["se", "tr", "mr"])
def test_modulated_methods_train_and_evaluate(name):
    model, split = cnn_model(), data(n=32)
    strategy = METHODS[name].build(fsmtl.strategies.MethodOptions(keep_ratio=0.5))
    trainer = fit(strategy, model, split, epochs=2)
    assert len(trainer.history["loss"]) == 2
    metrics = trainer.evaluate(split)
    assert len(metrics) == 3
    # Task forwards differ (each task its own modulation) and no trunk forward runs without a task.
    x = split.inputs[0][:4]
    assert not torch.allclose(point_outputs(model, x, 0)[-1], point_outputs(model, x, 1)[-1])
    model.train()
    with pytest.raises(RuntimeError, match="run model\\(x, task\\)"):
        model.features(x)
