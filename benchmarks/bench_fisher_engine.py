"""pytest-benchmark: Fisher estimation, ours against torch.func, Opacus and BackPACK, side by side.

One group per (model, N); the peers, models and loss are those of ``fisher_engine_table.py``
(which also reports peak memory). Each peer's result is checked against ours before timing.

Run (CPU, 2 threads)::

    OMP_NUM_THREADS=2 OMP_WAIT_POLICY=PASSIVE python -m pytest benchmarks/bench_fisher_engine.py

(``OMP_WAIT_POLICY=PASSIVE`` keeps 2-thread timings sane on cores shared with other processes.)

Peers that cannot be imported (``opacus``, ``backpack-for-pytorch``) are skipped with the reason.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from fisher_engine_table import (  # noqa: E402
    METHODS,
    SIZES,
    check_agreement,
    make_input,
    make_model,
    setup,
    unavailable_reason,
)

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_fisher_engine(benchmark, kind, n, method):
    reason = unavailable_reason(method)
    if reason is not None:
        pytest.skip(reason)
    torch.manual_seed(0)
    model = make_model(kind)
    x = make_input(kind, n)
    fn = setup(method, model, x)
    result = fn()  # also the warm-up: lazy initialisation stays out of the calibration
    if method not in ("ours", "backward"):
        check_agreement(setup("ours", model, x)(), result, method)
    del result
    benchmark.group = f"fisher-engine-{kind}-N{n}"
    benchmark.extra_info.update(
        model=kind, N=n, params=sum(p.numel() for p in model.parameters()), threads=torch.get_num_threads()
    )
    if method in ("func", "opacus") and n >= 512:  # ~1 s a call here: a few rounds suffice
        benchmark.pedantic(fn, rounds=3, warmup_rounds=1)
    else:
        benchmark(fn)
