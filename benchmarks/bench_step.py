"""One training step of T = 8 tasks on the digits-attributes MLP, side by side:
dense MTL (one backward), the floor (forward + T backward passes), FSMTL with the batched
vector-Jacobian product, with T sequential backward passes and with the default rule
(``batched="auto"``), and torchjd aggregator steps (UPGrad, MGDA).

Run: ``OMP_NUM_THREADS=2 python -m pytest benchmarks/bench_step.py --benchmark-only``. The
table over model sizes, T and memory is ``benchmarks/step_table.py``.
"""

import pytest
import torch

import fsmtl
import fsmtl_kernels as fk
from fsmtl.data import load_benchmark
from fsmtl.models import build_model
from fsmtl.tasks.losses import task_loss

BATCH = 64


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    bench = load_benchmark("digits-attributes")
    model = build_model(bench)
    x = bench.train.inputs[0][:BATCH]
    ys = [y[:BATCH] for y in bench.train.targets]
    params = model.masked_parameters()
    scores = [torch.rand(len(bench.tasks), *p.shape) for p in params]
    mask = fk.topk_mask_batched(scores, 0.5)
    return bench, model, x, ys, mask


def losses(bench, model, x, ys):
    features = model.features(x)
    return [task_loss(t, h(features), y) for t, h, y in zip(bench.tasks, model.heads, ys)]


def zero(model):
    for p in model.parameters():
        p.grad = None


def run_dense(bench, model, x, ys, mask):
    zero(model)
    torch.stack(losses(bench, model, x, ys)).sum().backward()


def run_floor(bench, model, x, ys, mask):
    zero(model)
    params = [p for p in model.parameters() if p.requires_grad]
    for loss in losses(bench, model, x, ys):
        torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)


def run_fs(batched):
    def step(bench, model, x, ys, mask):
        zero(model)
        fsmtl.masked_multitask_backward(
            losses(bench, model, x, ys),
            model.masked_parameters(),
            mask,
            head_params=model.head_parameters(),
            batched=batched,
        )

    return step


def run_torchjd(name):
    from fsmtl.strategies import JacobianAggregation, TrainingContext

    strategy = JacobianAggregation(name)

    def step(bench, model, x, ys, mask):
        strategy.context = TrainingContext(model, bench.tasks, None, None)
        zero(model)
        strategy.backward(losses(bench, model, x, ys))

    return step


STEPS = {
    "dense-mtl": run_dense,
    "floor-T-backward": run_floor,
    "fsmtl-batched-vjp": run_fs(True),
    "fsmtl-sequential": run_fs(False),
    "fsmtl-auto": run_fs("auto"),
    "torchjd-upgrad": run_torchjd("upgrad"),
    "torchjd-mgda": run_torchjd("mgda"),
}


@pytest.mark.parametrize("name", list(STEPS))
def test_step(benchmark, setup, name):
    benchmark.group = "train step, T=8, digits MLP 64-128-128, batch 64"
    benchmark.extra_info["method"] = name
    benchmark(STEPS[name], *setup)
