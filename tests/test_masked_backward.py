"""The streaming masked multi-task backward: every path writes the ``.grad`` of the
reference formula (paper Eq. 4), checked in float64 against one fresh forward/backward per task:
homogeneous and heterogeneous tasks, full and partial masks (masked layers on top, at the
bottom, and a skip connection around the boundary), both normalizations, batched, sequential and
auto, mask_forward, and through the sparse strategy."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fsmtl
import fsmtl_kernels as fk
from fsmtl.gradients import ForwardRecord
from fsmtl.strategies import RandomSparse, TrainingContext

T = 3
REGRESSION_TASKS = [fsmtl.Task(f"t{t}", "regression", 1) for t in range(T)]
DIM = 6


class SkipTrunk(nn.Module):
    """``top(tanh(b(2 h)) + h)``, ``h = relu(a(x))``: ``h`` reaches the output around the masked
    ``b``'s input ``2 h``, so a boundary at that input does not separate ``a`` from the losses."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(DIM, 8)
        self.b = nn.Linear(8, 8)
        self.top = nn.Linear(8, 8)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.top(torch.tanh(self.b(2 * h)) + h)


def sequential_trunk():
    return nn.Sequential(
        nn.Linear(DIM, 9), nn.ReLU(), nn.Linear(9, 9), nn.Tanh(), nn.Linear(9, 8), nn.ReLU(), nn.Linear(8, 8)
    )


TRUNKS = {
    "full": (sequential_trunk, None),
    "top2": (sequential_trunk, ["4", "6"]),
    "bottom": (sequential_trunk, ["0"]),
    "middle": (sequential_trunk, ["2"]),
    "skip": (SkipTrunk, ["b"]),
}


def make_model(kind):
    torch.manual_seed(0)
    build, masked_modules = TRUNKS[kind]
    model = fsmtl.MultiTaskModel(build(), [nn.Linear(8, 1) for _ in range(T)], masked_modules=masked_modules)
    return model.double()


def make_mask(model, seed=1, p=0.5):
    gen = torch.Generator().manual_seed(seed)
    bools = [torch.rand(T, *q.shape, generator=gen) < p for q in model.masked_parameters()]
    bools[0][:, 0] = False  # an entry (row) no task holds: "selected" gives 0 there
    return fk.PackedMask.from_bool_stacked(bools)


def make_data(heterogeneous):
    gen = torch.Generator().manual_seed(2)
    xs = [torch.randn(5, DIM, generator=gen, dtype=torch.float64) for _ in range(T if heterogeneous else 1)]
    ys = [torch.randn(5, 1, generator=gen, dtype=torch.float64) for _ in range(T)]
    return (xs if heterogeneous else xs * T), ys


def task_losses(model, xs, ys, masks=None, shared_forward=True, record=None):
    if shared_forward and masks is None and all(x is xs[0] for x in xs):
        features = model.features(xs[0], record=record)
        return [((h(features) - y) ** 2).mean() for h, y in zip(model.heads, ys)]
    masks = masks or [None] * T
    return [((model(x, t, m, record=record) - y) ** 2).mean() for t, (x, y, m) in enumerate(zip(xs, ys, masks))]


def reference_grads(model, mask, xs, ys, normalize, mask_forward):
    """Eq. 4 in float64 from T separate forward/backward passes: masked parameters
    ``sum_t S_t g_t / T`` (or ``/ sum_t S_t``, 0 where none), dense trunk parameters the task
    average, heads the gradient of their own task's loss."""
    masked = model.masked_parameters()
    dense = model.dense_shared_parameters()
    heads = model.head_parameters()
    bools = mask.to_bool_stacked()
    sums = [torch.zeros_like(p) for p in masked]
    dense_sum = [torch.zeros_like(p) for p in dense]
    head_sum = [torch.zeros_like(p) for p in heads]
    names = model.masked_parameter_names()
    for t in range(T):
        if mask_forward:  # Eq. 3 spelled out: the trunk on S_t * theta (no saved-tensor hooks)
            weights = {n: p * b[t] for n, p, b in zip(names, masked, bools)}
            features = torch.func.functional_call(model.trunk, weights, (xs[t],))
        else:
            features = model.trunk(xs[t])
        loss = ((model.heads[t](features) - ys[t]) ** 2).mean()
        grads = torch.autograd.grad(loss, masked + dense + heads, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, masked + dense + heads)]
        for s, g, b in zip(sums, grads, bools):
            s += g * b[t]
        for s, g in zip(dense_sum, grads[len(masked) : len(masked) + len(dense)]):
            s += g
        for s, g in zip(head_sum, grads[len(masked) + len(dense) :]):
            s += g
    count = [b.sum(0) for b in bools]
    if normalize == "tasks":
        shared = [s / T for s in sums]
    else:
        shared = [torch.where(c > 0, s / c.clamp_min(1), torch.zeros_like(s)) for s, c in zip(sums, count)]
    return shared + [s / T for s in dense_sum] + head_sum


def check(model, expected):
    got = model.masked_parameters() + model.dense_shared_parameters() + model.head_parameters()
    for i, (p, e) in enumerate(zip(got, expected, strict=True)):
        assert p.grad is not None, i
        assert p.grad.dtype == torch.float64
        torch.testing.assert_close(p.grad, e, atol=1e-12, rtol=1e-10, msg=lambda m, i=i: f"param {i}: {m}")


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "linear_record"])
@pytest.mark.parametrize("batched", [False, True, "auto", "measure"])
@pytest.mark.parametrize("normalize", fk.NORMALIZE_MODES)
@pytest.mark.parametrize("kind", list(TRUNKS))
@pytest.mark.parametrize("heterogeneous", [False, True], ids=["homogeneous", "heterogeneous"])
def test_function_matches_reference(kind, normalize, batched, heterogeneous, fused):
    model = make_model(kind)
    mask = make_mask(model)
    xs, ys = make_data(heterogeneous)
    expected = reference_grads(model, mask, xs, ys, normalize, mask_forward=False)
    model.zero_grad(set_to_none=True)
    record = ForwardRecord(linear_calls=fused)
    losses = task_losses(model, xs, ys, record=record)
    assert record.trunk_forwards == (T if heterogeneous else 1)
    assert bool(record.boundary) == (kind not in ("full", "bottom"))  # the first masked module's input
    assert bool(record.linears) == fused
    fsmtl.masked_multitask_backward(
        losses,
        model.masked_parameters(),
        mask,
        dense_params=model.dense_shared_parameters(),
        head_params=model.head_parameters(),
        normalize=normalize,
        batched=batched,
        record=record,
    )
    check(model, expected)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("normalize", fk.NORMALIZE_MODES)
@pytest.mark.parametrize("kind", ["full", "top2", "skip"])
@pytest.mark.parametrize("mask_forward", [False, True], ids=["eq4", "mask_forward"])
@pytest.mark.parametrize("heterogeneous", [False, True], ids=["homogeneous", "heterogeneous"])
def test_strategy_backward_matches_reference(kind, normalize, mask_forward, heterogeneous, backend, monkeypatch):
    if backend == "cpp" and fk.backends.unavailable_reason("cpp", torch.device("cpu")) is not None:
        pytest.skip("cpp backend unavailable")
    monkeypatch.setenv("FSMTL_BACKEND", backend)
    model = make_model(kind)
    mask = make_mask(model, seed=3, p=0.6)
    xs, ys = make_data(heterogeneous)
    expected = reference_grads(model, mask, xs, ys, normalize, mask_forward)
    strategy = RandomSparse(0.5, mask_forward=mask_forward, normalize=normalize)
    strategy.context = TrainingContext(model, REGRESSION_TASKS, None, None)
    strategy.set_mask(mask)
    model.zero_grad(set_to_none=True)
    masks = [strategy.forward_mask(t) for t in range(T)]
    record = strategy.forward_record()
    losses = task_losses(model, xs, ys, None if not mask_forward else masks, record=record)
    strategy.backward(losses, record)
    check(model, expected)


def test_full_masks_equal_dense_mtl():
    model = make_model("top2")
    xs, ys = make_data(False)
    ones = [torch.ones(T, *p.shape, dtype=torch.bool) for p in model.masked_parameters()]
    full = fk.PackedMask.from_bool_stacked(ones)
    record = ForwardRecord()
    losses = task_losses(model, xs, ys, record=record)
    fsmtl.masked_multitask_backward(
        losses,
        model.masked_parameters(),
        full,
        dense_params=model.dense_shared_parameters(),
        head_params=model.head_parameters(),
        record=record,
        batched=False,
    )
    ours = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    fsmtl.gradients.dense_multitask_backward(task_losses(model, xs, ys), model.shared_parameters())
    for a, p in zip(ours, model.parameters(), strict=True):
        torch.testing.assert_close(a, p.grad, atol=1e-13, rtol=1e-12)


def boundary_path(kind):
    """The path of one masked backward of the ``kind`` trunk with the record of its forward."""
    model = make_model(kind)
    xs, ys = make_data(False)
    record = ForwardRecord()
    losses = task_losses(model, xs, ys, record=record)
    dense = model.dense_shared_parameters()
    path = fsmtl.masked_multitask_backward(
        losses, model.masked_parameters(), make_mask(model), dense_params=dense,
        head_params=model.head_parameters(), record=record, batched=False,
    )  # fmt: skip
    return path, record, dense


def test_boundary_split_top_masks_leave_bottom_layers_below():
    path, record, dense = boundary_path("top2")
    assert len(record.boundary) == 1
    assert path.below == (0, 1, 2, 3) == tuple(range(len(dense)))  # layers 0 and 2 run once, below the cut


def test_boundary_split_keeps_bypassed_parameters_per_task():
    """The skip connection reaches layer ``a`` around the boundary; ``top`` lies above it."""
    path, record, dense = boundary_path("skip")
    assert record.boundary and path.below == () and dense


def test_no_boundary_recorded_without_grad_or_dense_layers():
    model = make_model("top2")
    xs, _ = make_data(False)
    record = ForwardRecord()
    with torch.no_grad():
        model.features(xs[0], record=record)
    assert (record.boundary, record.trunk_forwards, record.linears) == ((), 0, [])
    full = make_model("full")
    full.features(xs[0], record=record)
    assert record.boundary == () and record.trunk_forwards == 1 and len(record.linears) == 4


def test_a_forward_without_a_record_leaves_nothing_on_the_model():
    """The record is the caller's: a model that ran forwards deep-copies and pickles as before."""
    import copy
    import pickle

    model = make_model("top2")
    xs, _ = make_data(False)
    record = ForwardRecord()
    model.features(xs[0], record=record)
    before = dict(vars(model))
    model.features(xs[0])
    assert dict(vars(model)).keys() == before.keys()
    assert record.trunk_forwards == 1  # the second forward had no record
    copy.deepcopy(model)
    pickle.loads(pickle.dumps(model))


def test_bad_batched_value():
    model = make_model("full")
    xs, ys = make_data(False)
    with pytest.raises(ValueError, match="batched"):
        fsmtl.masked_multitask_backward(
            task_losses(model, xs, ys), model.masked_parameters(), make_mask(model), head_params=(), batched="yes"
        )
    with pytest.raises(TypeError, match="not their sum"):
        fsmtl.masked_multitask_backward(
            sum(task_losses(model, xs, ys)), model.masked_parameters(), make_mask(model), head_params=()
        )
    with pytest.raises(ValueError, match="batched_grads"):
        RandomSparse(0.5, batched_grads="sometimes")


def test_batched_mode_holds_at_most_t_times_the_largest_parameter(monkeypatch):
    """Batched vector-Jacobian products run over chunks of tasks: never ``[T, P]`` at once."""
    model = make_model("full")
    mask = make_mask(model)
    xs, ys = make_data(False)
    inputs = model.masked_parameters() + model.head_parameters()
    total, largest = sum(p.numel() for p in inputs), max(p.numel() for p in inputs)
    seen = []
    grad = torch.autograd.grad

    def spy(*args, **kwargs):
        out = grad(*args, **kwargs)
        if kwargs.get("is_grads_batched"):
            seen.append(sum(g.numel() for g in out if g is not None))
        return out

    monkeypatch.setattr(torch.autograd, "grad", spy)
    path = fsmtl.masked_multitask_backward(
        task_losses(model, xs, ys), model.masked_parameters(), mask, head_params=model.head_parameters(), batched=True
    )
    # chunks of max(1, T * largest // total) tasks
    assert path.batched and path.task_chunk == max(1, T * largest // total)
    assert len(seen) > 1 and max(seen) <= max(T * largest, total) < T * total


def test_mask_forward_saves_no_masked_weight_copies(monkeypatch):
    """A masked forward's graph keeps each masked weight as (parameter, bool mask), rebuilt by
    the backward: no tensor it saves shares storage with a masked copy."""
    from fsmtl import model as model_module

    model = make_model("full")
    mask = make_mask(model)
    xs, _ = make_data(False)
    packed, kept = [], []
    pack = model_module._SavedMasked.pack

    def spy(self, t):
        out = pack(self, t)
        (packed if isinstance(out, tuple) else kept).append(out)
        if not isinstance(out, tuple):
            assert out.untyped_storage().data_ptr() not in self.sources
        return out

    monkeypatch.setattr(model_module._SavedMasked, "pack", spy)
    model(xs[0], 0, mask.to_bool(0)).sum().backward()
    # The weights of Linear layers 2-4 (layer 1's input needs no gradient, biases are not saved).
    assert len(packed) == 3
    assert all(any(p is q for q in model.masked_parameters()) for _, p, *_ in packed)


@pytest.mark.parametrize("normalize", fk.NORMALIZE_MODES)
@pytest.mark.parametrize("kind", ["full", "top2", "skip"])
@pytest.mark.parametrize("mask_forward", [False, True], ids=["eq4", "mask_forward"])
def test_stream_one_task_at_a_time_matches_reference(kind, normalize, mask_forward):
    """MaskedBackwardStream: task t's forward, then its backward (graph freed), then task t + 1's:
    the reference .grad in float64, and the same bits as masked_multitask_backward on the same
    losses."""
    model = make_model(kind)
    mask = make_mask(model, seed=4)
    xs, ys = make_data(heterogeneous=True)
    expected = reference_grads(model, mask, xs, ys, normalize, mask_forward)
    masks = [[m[t] for m in mask.to_bool_stacked()] for t in range(T)] if mask_forward else [None] * T
    model.zero_grad(set_to_none=True)
    args = (model.masked_parameters(), mask)
    kwargs = dict(
        dense_params=model.dense_shared_parameters(), head_params=model.head_parameters(), normalize=normalize
    )
    with fsmtl.MaskedBackwardStream(*args, num_tasks=T, **kwargs) as stream:
        for t in range(T):
            loss = ((model(xs[t], t, masks[t]) - ys[t]) ** 2).mean()
            stream.backward(t, loss)
            with pytest.raises(RuntimeError):  # the graph was freed: one task graph alive at a time
                loss.backward()
        stream.finish()
    check(model, expected)
    streamed = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    losses = [((model(xs[t], t, masks[t]) - ys[t]) ** 2).mean() for t in range(T)]
    fsmtl.masked_multitask_backward(losses, *args, batched=False, **kwargs)
    for s, p in zip(streamed, model.parameters(), strict=True):
        assert torch.equal(s, p.grad)


def test_stream_misuse_is_named_and_writes_nothing():
    model = make_model("full")
    mask = make_mask(model)
    params = model.masked_parameters()
    kwargs = dict(head_params=model.head_parameters())
    with pytest.raises(ValueError, match="num_tasks"):
        fsmtl.MaskedBackwardStream(params, mask, num_tasks=T + 1, **kwargs)
    xs, ys = make_data(heterogeneous=False)
    model.zero_grad(set_to_none=True)
    with fsmtl.MaskedBackwardStream(params, mask, num_tasks=T, **kwargs) as stream:
        loss = ((model(xs[0], 0) - ys[0]) ** 2).mean()
        with pytest.raises(ValueError, match="task must be"):
            stream.backward(T, loss)
        with pytest.raises(ValueError, match="scalar"):
            stream.backward(0, torch.zeros(2, requires_grad=True))
        stream.backward(0, loss)
        with pytest.raises(ValueError, match="already"):
            stream.backward(0, ((model(xs[0], 0) - ys[0]) ** 2).mean())
        with pytest.raises(ValueError, match=r"task\(s\) \[1, 2\]"):
            stream.finish()
    assert all(p.grad is None for p in model.masked_parameters())
    assert not any(p._post_accumulate_grad_hooks for p in params)  # hooks removed


def test_mask_of_other_shapes_is_refused_before_any_backward():
    model = make_model("top2")
    other = make_mask(make_model("full"))  # T rows, but over the whole trunk's shapes
    xs, ys = make_data(heterogeneous=False)
    losses = task_losses(model, xs, ys)
    model.zero_grad(set_to_none=True)
    with pytest.raises(ValueError, match="masked_params have shapes"):
        fsmtl.masked_multitask_backward(losses, model.masked_parameters(), other, head_params=model.head_parameters())
    assert all(p.grad is None for p in model.parameters())


def recorded_step(trunk, seed, normalize):
    """A float64 model over ``trunk`` recording its Linear calls, a mask, the reference .grad, and
    one step's losses with the record of their forward."""
    model = fsmtl.MultiTaskModel(trunk, [nn.Linear(8, 1) for _ in range(T)]).double()
    mask = make_mask(model, seed=seed)
    xs, ys = make_data(heterogeneous=False)
    expected = reference_grads(model, mask, xs, ys, normalize, mask_forward=False)
    model.zero_grad(set_to_none=True)
    record = ForwardRecord()
    losses = task_losses(model, xs, ys, record=record)
    return model, mask, expected, losses, record


class TiedTrunk(nn.Module):
    """``b`` shares ``a``'s weight (two uses of one parameter) and ``c`` is called twice."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)
        self.b.weight = self.a.weight
        self.c = nn.Linear(8, 8)
        self.inp = nn.Linear(DIM, 8)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        return self.c(torch.tanh(self.c(self.b(torch.tanh(self.a(h))))))


SPECIAL_TRUNKS = {
    "inplace-relu": lambda: nn.Sequential(nn.Linear(DIM, 8), nn.ReLU(inplace=True), nn.Linear(8, 8)),
    "tied-and-reused": TiedTrunk,
    "3d-input": lambda: nn.Sequential(nn.Unflatten(1, (2, 3)), nn.Linear(3, 4), nn.Flatten(), nn.Linear(8, 8)),
}


@pytest.mark.parametrize("name", list(SPECIAL_TRUNKS))
def test_linear_record_falls_back_where_the_fused_weight_gradient_would_be_wrong(name):
    """An output changed in place, a tied or twice-called weight, a 3-D input: the fused path
    must not take these weights (their gradient is not one G^T X), and .grad stays exact."""
    torch.manual_seed(0)
    model, mask, expected, losses, record = recorded_step(SPECIAL_TRUNKS[name](), seed=6, normalize="tasks")
    path = fsmtl.masked_multitask_backward(
        losses,
        model.masked_parameters(),
        mask,
        head_params=model.head_parameters(),
        batched=False,
        record=record,
    )
    check(model, expected)
    names = model.masked_parameter_names()
    expected_taken = {"inplace-relu": ["2.weight"], "tied-and-reused": ["inp.weight"], "3d-input": ["3.weight"]}
    assert sorted(names[i] for i in path.fused) == expected_taken[name]


def test_linear_calls_are_recorded_only_for_a_masked_backward_that_takes_them():
    """A forward records nothing unless given a record; a sparse strategy's record asks for the
    Linear calls, and its backward takes the fused path with it."""
    torch.manual_seed(0)
    model = fsmtl.MultiTaskModel(sequential_trunk(), [nn.Linear(8, 1) for _ in range(T)]).double()
    xs, ys = make_data(heterogeneous=False)
    plain = ForwardRecord(linear_calls=False)
    model.features(xs[0], record=plain)
    assert plain.linears == [] and plain.trunk_forwards == 1
    strategy = RandomSparse(0.5)
    strategy.bind(TrainingContext(model, REGRESSION_TASKS, None, None))
    record = strategy.forward_record()
    losses = task_losses(model, xs, ys, record=record)
    assert [r[0] for r in record.linears] == [0, 2, 4, 6]  # the 4 Linear weights, in call order
    strategy.set_mask(make_mask(model))
    expected = reference_grads(model, strategy.mask, xs, ys, "tasks", mask_forward=False)
    model.zero_grad(set_to_none=True)
    strategy.backward(losses, record)
    check(model, expected)


@pytest.mark.parametrize("tasks_per_chunk", [1, 2, T])
def test_linear_record_takes_the_fused_path_in_chunks(monkeypatch, tasks_per_chunk):
    """With the record, every Linear weight's masked sum comes from masked_matmul_accumulate (in
    chunks of tasks when the memory bound asks for it), and .grad is the reference's."""
    calls = []
    original = fk.masked_matmul_accumulate

    def spy(acc, a, b, mask, index, first_task=0, **kwargs):
        calls.append((index, first_task, a.shape[0]))
        return original(acc, a, b, mask, index, first_task, **kwargs)

    monkeypatch.setattr(fk, "masked_matmul_accumulate", spy)
    model = make_model("full")
    mask = make_mask(model, seed=8)
    xs, ys = make_data(heterogeneous=False)
    expected = reference_grads(model, mask, xs, ys, "tasks", mask_forward=False)
    model.zero_grad(set_to_none=True)
    record = ForwardRecord()
    losses = task_losses(model, xs, ys, record=record)
    heads = model.head_parameters()
    path = fsmtl.masked_multitask_backward(
        losses, model.masked_parameters(), mask, head_params=heads, batched=False, record=record,
        task_chunk_size=tasks_per_chunk,
    )  # fmt: skip
    check(model, expected)
    assert path.fused == (0, 2, 4, 6) and path.task_chunk == tasks_per_chunk and not path.batched
    firsts = list(range(0, T, tasks_per_chunk))
    assert sorted(calls) == sorted((i, f, min(tasks_per_chunk, T - f)) for i in (0, 2, 4, 6) for f in firsts)


def test_fused_linear_beside_large_convolutions_keeps_the_per_layer_hooks():
    """Convolutions hold most masked entries: their gradients stay on the per-layer hooks (cache)
    while the Linear weight takes the fused op; .grad is the reference's."""
    torch.manual_seed(0)
    trunk = nn.Sequential(
        nn.Unflatten(1, (1, DIM)), nn.Conv1d(1, 64, 3, padding=1), nn.Tanh(), nn.Conv1d(64, 64, 3, padding=1),
        nn.ReLU(), nn.Flatten(), nn.Linear(64 * DIM, 8),
    )  # fmt: skip
    model, mask, expected, losses, record = recorded_step(trunk, seed=9, normalize="selected")
    heads = model.head_parameters()
    path = fsmtl.masked_multitask_backward(
        losses, model.masked_parameters(), mask, head_params=heads, normalize="selected", batched=False,
        record=record,
    )  # fmt: skip
    check(model, expected)
    assert path.hooked and path.fused == (4,)  # the Linear weight is masked parameter 4
