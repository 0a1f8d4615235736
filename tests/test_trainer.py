"""Trainer boundary checks (every misuse: error type, the task named, nothing
modified), DataLoader vs Split, counters across fit calls, validation, schedulers, bf16 autocast."""

import json
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

import fsmtl
from fsmtl.data import Split
from fsmtl.gradients import masked_multitask_backward
from fsmtl.strategies import EqualWeighting, FisherSparse, MaskSchedule, RandomSparse
from fsmtl.tasks import Task

TASKS = [Task("smile", "binary", 1), Task("age", "regression", 1), Task("digit", "multiclass", 3)]


def make_model(seed=0, outputs=(1, 1, 3), dropout=0.0):
    torch.manual_seed(seed)
    trunk = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Dropout(dropout), nn.Linear(12, 12), nn.ReLU())
    return fsmtl.MultiTaskModel(trunk, [nn.Linear(12, k) for k in outputs])


def make_split(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    ys = [(x[:, 0] > 0).float(), x[:, 1] * 0.5, (x[:, 2] > 0).long() + (x[:, 3] > 0).long()]
    return Split([x] * 3, ys)


def make_trainer(strategy=None, model=None, seed=0, **kwargs):
    model = model if model is not None else make_model()
    strategy = strategy if strategy is not None else EqualWeighting()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return fsmtl.Trainer(model, TASKS, strategy, opt, seed=seed, **kwargs)


def params(model):
    return [p.detach().clone() for p in model.state_dict().values()]


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def expect_unchanged(trainer, data, exc, *fragments, **fit_kwargs):
    """``fit`` raises ``exc`` naming every fragment, and no parameter or counter moved."""
    before = params(trainer.model)
    with pytest.raises(exc) as info:
        trainer.fit(data, epochs=1, batch_size=16, **fit_kwargs)
    for fragment in fragments:
        assert fragment in str(info.value)
    assert_same(before, params(trainer.model))
    assert trainer.global_step == 0 and trainer.history["loss"] == []
    return info.value


# ------------------------------------------------------------------------------- misuse


def test_homogeneous_split_with_distinct_inputs_is_an_error():
    split = make_split()
    other = split.inputs[0] + 1
    bad = Split([split.inputs[0], other, split.inputs[0]], split.targets)
    expect_unchanged(make_trainer(), bad, ValueError, "'age'", "homogeneous")


def test_regression_targets_shaped_n_by_1_are_an_error():
    split = make_split()
    bad = Split(split.inputs, [split.targets[0], split.targets[1][:, None], split.targets[2]])
    expect_unchanged(make_trainer(), bad, ValueError, "'age'", "regression")


def test_binary_targets_in_minus_one_one_are_an_error():
    split = make_split()
    bad = Split(split.inputs, [split.targets[0] * 2 - 1, *split.targets[1:]])
    expect_unchanged(make_trainer(), bad, ValueError, "'smile'", "{0, 1}")


def test_float_multiclass_targets_are_an_error():
    split = make_split()
    bad = Split(split.inputs, [*split.targets[:2], split.targets[2].float()])
    expect_unchanged(make_trainer(), bad, ValueError, "'digit'", "int64")


def test_multiclass_label_out_of_range_is_an_error():
    split = make_split()
    bad = Split(split.inputs, [*split.targets[:2], split.targets[2] + 1])
    expect_unchanged(make_trainer(), bad, ValueError, "'digit'", "[0, 3)")


def test_two_output_binary_head_is_an_error():
    trainer = make_trainer(model=make_model(outputs=(2, 1, 3)))
    expect_unchanged(trainer, make_split(), ValueError, "'smile'", "[2, 2]")


def test_empty_split_is_an_error():
    split = make_split()
    empty = Split([split.inputs[0][:0]] * 3, [y[:0] for y in split.targets])
    expect_unchanged(make_trainer(), empty, ValueError, "'smile'", "empty")


def test_loader_batch_with_mismatched_lengths_is_an_error():
    split = make_split()
    batches = [(split.inputs[0][:16], [split.targets[0][:16], split.targets[1][:8], split.targets[2][:16]])]
    expect_unchanged(make_trainer(), batches, ValueError, "'age'", "16 inputs")


def test_loader_batch_with_missing_task_name_is_an_error():
    split = make_split()
    batches = [(split.inputs[0][:16], {"smile": split.targets[0][:16], "age": split.targets[1][:16]})]
    expect_unchanged(make_trainer(), batches, ValueError, "'digit'")


def test_nan_in_the_data_is_an_error_naming_the_task():
    split = make_split()
    x = split.inputs[0].clone()
    x[5, 2] = float("nan")
    expect_unchanged(make_trainer(), Split([x] * 3, split.targets), ValueError, "'smile'", "NaN")
    y = split.targets[1].clone()
    y[3] = float("inf")
    expect_unchanged(make_trainer(), Split(split.inputs, [split.targets[0], y, split.targets[2]]), ValueError, "'age'")


def test_nonfinite_loss_names_task_epoch_and_step_or_is_skipped_and_counted():
    split = make_split()
    huge = split.targets[1].clone()
    huge[:] = 3e38  # finite data whose squared error overflows to inf
    batches = [(split.inputs[0][:16], [split.targets[0][:16], huge[:16], split.targets[2][:16]])]
    err = expect_unchanged(make_trainer(), batches, FloatingPointError, "'age'", "epoch 0", "step 0")
    assert "nothing was updated" in str(err)
    trainer = make_trainer(skip_nonfinite=True)
    before = params(trainer.model)
    trainer.fit(batches, epochs=2)
    assert trainer.history["skipped_nonfinite"] == 2 and trainer.global_step == 2
    assert_same(before, params(trainer.model))


def test_compute_masks_with_128_inputs_and_64_targets_is_an_error():
    model = make_model()
    split = make_split(128)
    batches = [
        (split.inputs[0], split.targets[0][:64]),
        (split.inputs[0], split.targets[1]),
        (split.inputs[0], split.targets[2]),
    ]
    with pytest.raises(ValueError, match="'smile'.*128 inputs"):
        fsmtl.compute_masks(model, TASKS, batches, 0.5)


@pytest.mark.parametrize("ratio", [0, -3, 0.0, -0.5])
def test_keep_ratio_zero_or_negative_fails_at_construction(ratio):
    with pytest.raises(ValueError, match="keep_ratio"):
        FisherSparse(ratio)
    with pytest.raises(ValueError, match="keep_ratio"):
        RandomSparse(ratio)


def test_warmup_covering_the_whole_run_warns_and_no_mask_is_used():
    trainer = make_trainer(FisherSparse(0.5, samples=8, schedule=MaskSchedule(warmup=2, every=1)))
    with pytest.warns(UserWarning, match="warm-up .* covers the whole run"):
        trainer.fit(make_split(), epochs=2, batch_size=16)
    assert trainer.history["mask_updates"] == [] and trainer.strategy.mask is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the third epoch does update the mask: no warning
        trainer.fit(make_split(), epochs=1, batch_size=16)
    assert [u["epoch"] for u in trainer.history["mask_updates"]] == [2]


def test_masked_multitask_backward_without_head_params_is_an_error():
    model = make_model()
    x = make_split().inputs[0]
    feats = model.features(x)
    losses = [model.heads[t](feats).sum() for t in range(3)]
    with pytest.raises(TypeError, match="head_params"):
        masked_multitask_backward(losses, model.masked_parameters(), None)
    assert all(p.grad is None for p in model.parameters())


def test_strategy_methods_before_fit_say_so():
    strategy = FisherSparse(0.5)
    with pytest.raises(RuntimeError, match="Trainer.fit"):
        strategy.update_mask()
    with pytest.raises(RuntimeError, match="Trainer.fit"):
        strategy.backward([torch.zeros(())])


def test_fit_twice_continues_the_counters_bit_for_bit():
    def strategy():
        return FisherSparse(0.5, samples=16, schedule=MaskSchedule(warmup=2, every=2), mask_forward=True)

    twice = make_trainer(strategy(), model=make_model(dropout=0.2))
    torch.manual_seed(0)  # dropout draws from the global stream: give both runs the same one
    twice.fit(make_split(), epochs=3, batch_size=16)
    twice.fit(make_split(), epochs=3, batch_size=16)
    assert [u["epoch"] for u in twice.history["mask_updates"]] == [2, 4]
    assert twice.epoch == 6 and twice.global_step == 18
    once = make_trainer(strategy(), model=make_model(dropout=0.2))
    torch.manual_seed(0)
    once.fit(make_split(), epochs=6, batch_size=16)
    assert_same(params(once.model), params(twice.model))
    assert once.history["loss"] == twice.history["loss"]


def test_fit_argument_errors():
    trainer = make_trainer()
    for kwargs, fragment in [
        ({"epochs": -1, "batch_size": 4}, "epochs"),
        ({"epochs": 1, "batch_size": 0}, "batch_size"),
        ({"epochs": 1, "batch_size": 4, "restore_best": True}, "val"),
        ({"epochs": 1, "batch_size": 4, "checkpoint_every": 2}, "checkpoint_dir"),
    ]:
        with pytest.raises(ValueError, match=fragment):
            trainer.fit(make_split(), **kwargs)
    with pytest.raises(TypeError, match="Split, a torch Dataset"):
        trainer.fit(torch.zeros(3), epochs=1, batch_size=4)
    with pytest.raises(ValueError, match="amp"):
        make_trainer(amp="fp8")


# ------------------------------------------------------------------------------- data


def test_dataset_and_dataloader_train_exactly_as_the_split_for_the_same_order():
    split = make_split()
    ref = make_trainer(FisherSparse(0.5, samples=16, schedule=MaskSchedule(1, 1)))
    ref.fit(split, epochs=3, batch_size=16)

    dataset = TensorDataset(split.inputs[0], *split.targets)
    by_dataset = make_trainer(FisherSparse(0.5, samples=16, schedule=MaskSchedule(1, 1)))
    by_dataset.fit(dataset, epochs=3, batch_size=16)
    assert_same(params(ref.model), params(by_dataset.model))

    # A user's DataLoader whose sampler draws randperm from a generator seeded like the trainer's.
    loader = DataLoader(
        dataset, batch_size=16, sampler=RandomSampler(dataset, generator=torch.Generator().manual_seed(0))
    )
    by_loader = make_trainer(FisherSparse(0.5, samples=16, schedule=MaskSchedule(1, 1)))
    by_loader.fit(loader, epochs=3, fisher_data=split)
    assert_same(params(ref.model), params(by_loader.model))
    assert by_loader.evaluate(loader) is not None
    assert ref.evaluate(split) == by_dataset.evaluate(split)


def test_mapping_targets_and_heterogeneous_loaders():
    split = make_split()
    x, ys = split.inputs[0], split.targets
    batches = [(x[i : i + 16], {t.name: y[i : i + 16] for t, y in zip(TASKS, ys)}) for i in range(0, 48, 16)]
    trainer = make_trainer()
    trainer.fit(batches, epochs=2)
    assert trainer.global_step == 6
    # Heterogeneous: one dataset per task of different sizes; the longest (48 -> 3 steps) sets the epoch.
    model = make_model()
    het = fsmtl.Trainer(model, TASKS, EqualWeighting(), torch.optim.SGD(model.parameters(), 0.1), homogeneous=False)
    per_task = [TensorDataset(x[:n], y[:n]) for n, y in zip((48, 20, 9), ys)]
    het.fit(per_task, epochs=2, batch_size=16)
    assert het.global_step == 6
    metrics = het.evaluate(per_task)
    assert set(metrics[0]) == {"accuracy", "precision", "recall", "f1"} and set(metrics[1]) == {"mse", "mae"}


# ------------------------------------------------------------------------------- validation, schedulers, amp


def test_validation_history_log_best_epoch_restore_and_early_stopping(tmp_path):
    split, val = make_split(), make_split(seed=1)
    trainer = make_trainer()
    log = tmp_path / "val.jsonl"
    trainer.fit(split, epochs=4, batch_size=16, val=val, eval_every=2, log_path=log, restore_best=True)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    entries = [e for e in records if e["event"] == "val"]
    assert [e["epoch"] for e in entries] == [1, 3] == [e["epoch"] for e in trainer.history["val"]]
    steps = [e for e in records if e["event"] == "step"]
    assert [e["step"] for e in steps] == list(range(12))  # 3 steps per epoch, every step's task losses
    assert set(steps[0]) == {"event", "epoch", "step", "loss/smile", "loss/age", "loss/digit"}
    best = max(entries, key=lambda e: e["score"])
    assert trainer.history["best_epoch"] == best["epoch"]
    from fsmtl.tasks import primary_score

    assert primary_score(TASKS, trainer.evaluate(val)) == pytest.approx(best["score"], abs=1e-12)

    stopper = make_trainer()
    stopper.optimizer.param_groups[0]["lr"] = 0.0  # never improves after the first evaluation
    stopper.fit(split, epochs=10, batch_size=16, val=val, patience=2)
    assert stopper.history["stopped_early"] and stopper.epoch == 3


def test_lr_scheduler_per_epoch_and_per_step():
    for interval, expected in (("epoch", 0.05 * 0.5**2), ("step", 0.05 * 0.5**6)):
        model = make_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        trainer = fsmtl.Trainer(model, TASKS, EqualWeighting(), opt, scheduler=sched, scheduler_interval=interval)
        trainer.fit(make_split(), epochs=2, batch_size=16)
        assert opt.param_groups[0]["lr"] == pytest.approx(expected)


def test_reduce_lr_on_plateau_steps_on_each_validation_loss():
    """The Trainer feeds a ReduceLROnPlateau the validation loss (minus the primary score) after
    each validation: its learning rates are those of the same scheduler fed the recorded losses."""
    val = make_split(24, seed=1)
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=0, threshold=0.05)
    trainer = fsmtl.Trainer(model, TASKS, EqualWeighting(), opt, scheduler=sched)
    rates = []
    for _ in range(5):
        trainer.fit(make_split(), epochs=1, batch_size=16, val=val)
        rates.append(opt.param_groups[0]["lr"])
    replay_opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.05)
    replay = torch.optim.lr_scheduler.ReduceLROnPlateau(replay_opt, factor=0.5, patience=0, threshold=0.05)
    expected = []
    for entry in trainer.history["val"]:
        replay.step(-entry["score"])
        expected.append(replay_opt.param_groups[0]["lr"])
    assert rates == expected and len(set(rates)) > 1  # the rate changed, on the validations' schedule
    with pytest.raises(ValueError, match="ReduceLROnPlateau scheduler needs validation data"):
        trainer.fit(make_split(), epochs=1, batch_size=16)
    with pytest.raises(ValueError, match="scheduler_interval must be 'epoch'"):
        fsmtl.Trainer(model, TASKS, EqualWeighting(), opt, scheduler=sched, scheduler_interval="step")


def test_bf16_autocast_runs_the_forward_in_bf16_and_fisher_in_float32():
    trainer = make_trainer(FisherSparse(0.5, samples=16, schedule=MaskSchedule(1, 1)), amp="bf16")  # in turns
    seen = []
    trainer.model.trunk[0].register_forward_hook(lambda m, i, o: seen.append((m.training, o.dtype)))
    before = params(trainer.model)
    trainer.fit(make_split(), epochs=2, batch_size=16)
    train_dtypes = {d for training, d in seen if training}
    eval_dtypes = {d for training, d in seen if not training}  # the probe and the Fisher estimate
    assert train_dtypes == {torch.bfloat16}
    assert torch.float32 in eval_dtypes
    assert len(trainer.history["mask_updates"]) == 1
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, params(trainer.model)))
    assert all(torch.isfinite(torch.tensor(v)).all() for v in trainer.history["loss"])


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")),
    ],
)
def test_fp16_with_grad_scaler_trains_as_float32_and_counts_its_skips(device):
    """fp16 autocast with a GradScaler: the gradients are unscaled before the update (else the
    parameters would move 65536 times too far), so training follows the float32 run closely; every
    step the scaler skipped halved its scale and is counted in history["skipped_amp"]."""
    runs = {}
    for amp in (None, "fp16"):
        model = make_model().to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        strategy = FisherSparse(0.5, samples=16, schedule=MaskSchedule(1, 1), update="average")
        trainer = fsmtl.Trainer(model, TASKS, strategy, opt, amp=amp)
        trainer.fit(make_split(), epochs=3, batch_size=16)
        runs[amp] = trainer
    fp16, fp32 = runs["fp16"], runs[None]
    assert fp32.scaler is None and fp16.scaler.get_scale() == 65536.0 * 0.5 ** fp16.history["skipped_amp"]
    assert len(fp16.history["mask_updates"]) == 2
    torch.testing.assert_close(
        torch.tensor(fp16.history["loss"]), torch.tensor(fp32.history["loss"]), rtol=2e-2, atol=2e-3
    )
    for a, b in zip(fp16.model.parameters(), fp32.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-2)
