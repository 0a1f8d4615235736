"""Dispatch: backend selection, FSMTL_BACKEND, BackendUnavailableError, the one op namespace with its
kernels per dispatch key, the Triton segment tables, and all ops under torch.compile."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from cases import CPU, raises_naming, random_scores, total_entries

import fsmtl_kernels as fk
from fsmtl_kernels import backends, reference
from fsmtl_kernels.packed_mask import word_layout

OPS = ("fisher_accumulate", "linear_fisher", "masked_accumulate", "masked_grad_average", "topk_mask")


def test_backend_errors(monkeypatch):
    monkeypatch.setenv("FSMTL_BACKEND", "nonsense")
    raises_naming(ValueError, "FSMTL_BACKEND", lambda: fk.topk_mask([torch.ones(2)], 1))
    monkeypatch.setenv("FSMTL_BACKEND", "reference")
    assert fk.topk_mask([torch.ones(2)], 1).count().tolist() == [1]
    raises_naming(ValueError, "backend", lambda: backends.select("cuda", CPU))


def test_forcing_an_unavailable_backend_raises():
    with pytest.raises(fk.BackendUnavailableError, match="not available for meta tensors"):
        fk.fisher_accumulate([torch.zeros(2, device="meta")], [torch.ones(2, device="meta")], backend="cpp")


# ---------------------------------------------------------------------------------------------
# One namespace, one schema per op, kernels per dispatch key
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", OPS)
def test_one_schema_per_op(op):
    schema = getattr(torch.ops.fsmtl, op).default._schema
    assert schema.name == f"fsmtl::{op}"
    with pytest.raises((AttributeError, RuntimeError)):
        getattr(torch.ops.fsmtl_triton, op)


@pytest.mark.parametrize("op", OPS)
def test_kernels_take_the_schema_arguments(op, triton):
    """The Triton launcher (the CUDA kernel) and the reference take the schema's argument names;
    the reference masked average alone takes the mask's unpacked bool tensors instead of words."""
    from fsmtl_kernels.triton import LAUNCHERS

    names = [a.name for a in getattr(torch.ops.fsmtl, op).default._schema.arguments]
    assert list(inspect.signature(LAUNCHERS[op]).parameters) == names
    expected = ["grads", "masks", "normalize", "out"] if op == "masked_grad_average" else names
    assert list(inspect.signature(getattr(reference, op)).parameters) == expected
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fsmtl::{op}", "CUDA")


@pytest.mark.parametrize("op", OPS)
def test_cpu_kernel_registered(op, cpp):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fsmtl::{op}", "CPU")
    assert backends.kernel(op, "cpp", CPU) is getattr(torch.ops.fsmtl, op)


def test_auto_picks_cpp_on_cpu(cpp):
    from fsmtl_kernels import cpp as cpp_module

    assert backends.select("auto", CPU) is cpp_module
    assert "cpp" in fk.available_backends("cpu")
    assert cpp_module.unavailable_reason(torch.device("meta")) is not None


def test_missing_extension_warns_once_and_auto_falls_back():
    code = (
        "import sys, warnings\n"
        "sys.modules['fsmtl_kernels._C'] = None\n"
        "warnings.simplefilter('always')\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    import torch, fsmtl_kernels as fk\n"
        "    from fsmtl_kernels import backends\n"
        "    cpu = torch.device('cpu')\n"
        "    reasons = {backends.unavailable_reason('cpp', cpu) for _ in range(3)}\n"
        "    mask = fk.topk_mask([torch.tensor([3.0, 1.0, 2.0])], 2)\n"
        "    assert backends.select('auto', cpu) is backends.reference\n"
        "mine = [w for w in caught if 'C++ backend unavailable' in str(w.message)]\n"
        "assert len(mine) == 1, [str(w.message) for w in caught]\n"
        "(reason,) = reasons\n"
        "from fsmtl_kernels import cpp\n"
        "built = sorted(cpp.BUILD_ERROR_FILE.parent.glob('_C.*'))\n"
        "cause = 'is built' if built else 'is not built'\n"
        "assert 'fsmtl_kernels._C ' + cause in reason, reason\n"
        "assert 'pip install --no-build-isolation -e .' in reason\n"
        "assert '\\n' not in reason\n"
        "assert mask.to_bool()[0].tolist() == [True, False, True]\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("FSMTL_CPP_JIT", "FSMTL_BACKEND")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]


# ---------------------------------------------------------------------------------------------
# Triton: availability and the interpreter path
# ---------------------------------------------------------------------------------------------


@pytest.mark.interpreter
def test_triton_available_on_cpu_under_interpreter(triton):
    from fsmtl_kernels import triton as triton_backend
    from fsmtl_kernels.triton import LAUNCHERS

    assert triton_backend.is_interpreter()
    assert triton_backend.unavailable_reason(CPU) is None
    assert "triton" in fk.available_backends("cpu")
    assert "not on meta" in triton_backend.unavailable_reason(torch.device("meta"))
    # CPU tensors under the interpreter: the launchers themselves (the op's CPU key is C++'s).
    assert all(backends.kernel(op, "triton", CPU) is LAUNCHERS[op] for op in OPS)


def test_triton_clear_error_on_cpu_without_interpreter():
    """Without TRITON_INTERPRET, backend='triton' on CPU tensors raises BackendUnavailableError."""
    pytest.importorskip("triton", reason="triton is not installed")
    script = textwrap.dedent(
        """
        import os
        import torch
        import fsmtl_kernels as fk
        from fsmtl_kernels import triton as tb
        assert "triton" not in fk.available_backends("cpu")
        try:
            fk.topk_mask([torch.ones(3)], 1, backend="triton")
        except fk.BackendUnavailableError as exc:
            print("ERROR:", exc)
        else:
            raise SystemExit("no error raised")
        os.environ["TRITON_INTERPRET"] = "1"
        print("LATE:", tb.unavailable_reason(torch.device("cpu")))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    error = next(line for line in proc.stdout.splitlines() if line.startswith("ERROR:"))
    assert "backend='triton' is not available for cpu tensors" in error
    assert "set TRITON_INTERPRET=1 before importing fsmtl_kernels" in error
    late = next(line for line in proc.stdout.splitlines() if line.startswith("LATE:"))
    assert "was set after fsmtl_kernels.triton was imported" in late


def test_triton_segment_table_reads_cpu_pointers(triton):
    """The pointer-table design relies on the interpreter dereferencing CPU addresses in place."""
    a, b = torch.zeros(7), torch.zeros(40)
    fk.fisher_accumulate([a, b], [torch.full((7,), 2.0), torch.full((40,), 3.0)], backend=triton)
    assert torch.equal(a, torch.full((7,), 4.0)) and torch.equal(b, torch.full((40,), 9.0))


def test_triton_find_segment_skips_empty_parameters(triton, blocks):
    from cases import assert_same_mask

    shapes = [(0,), (5,), (0,), (3, 0), (70,), (0,)]
    scores = random_scores(shapes, 2, CPU)
    assert_same_mask(scores, [3, 75], triton)
    grads = [torch.randn(2, *s) for s in shapes]
    fisher = [torch.zeros(s) for s in shapes]
    fk.fisher_accumulate(fisher, [g[0] for g in grads], backend=triton)
    for f, g in zip(fisher, grads, strict=True):
        assert torch.equal(f, g[0].square())


def test_triton_segment_launches_group_by_key_and_alignment(triton):
    from fsmtl_kernels.triton import _utils

    a, b = torch.zeros(64), torch.zeros(65)[1:]  # 16-byte aligned and not
    segments = [
        _utils.Segment((a.data_ptr(),), 64, (7,), ("x",)),
        _utils.Segment((b.data_ptr(),), 64, (8,), ("x",)),
        _utils.Segment((a.data_ptr(),), 0, (9,), ("x",)),  # empty: no row
        _utils.Segment((a.data_ptr(),), 64, (10,), ("y",)),
    ]
    launches = _utils.segment_launches(segments, 32, CPU)
    assert [(launch.group, launch.meta["ALIGNED"], launch.n_blocks) for launch in launches] == [
        (("x",), True, 2),
        (("x",), False, 2),
        (("y",), True, 2),
    ]
    assert launches[1].table.tolist() == [[b.data_ptr(), 64, 0, 8]]


# ---------------------------------------------------------------------------------------------
# torch.compile: the registered ops in one graph
# ---------------------------------------------------------------------------------------------


def _step(per_sample_grads, task_grads, g_out, inputs, weight_fisher, bias_fisher):
    ops = torch.ops.fsmtl
    fisher = [torch.zeros(g.shape[1:], device=g.device) for g in per_sample_grads]
    ops.fisher_accumulate(fisher, per_sample_grads, 1.0 / per_sample_grads[0].shape[0], True)
    offsets, n_words = word_layout([f.numel() for f in fisher])
    scores = [f.unsqueeze(0).expand(3, *f.shape).contiguous() for f in fisher]
    words = ops.topk_mask(scores, [5, 500, 4000], offsets, n_words)
    out = [torch.empty(g.shape[1:], device=g.device) for g in task_grads]
    ops.masked_grad_average(task_grads, words, offsets, "selected", out)
    ops.linear_fisher(g_out, inputs, weight_fisher, bias_fisher, 1.0)
    return words, out


def _compare_compiled(device, compile_backend):
    """The registered ops (not the validating public functions, which read tensor values) compile
    into one graph with fullgraph=True and give the eager results."""
    shapes = [(7,), (31, 33), (4097,)]
    args = (
        [torch.randn(4, *s, device=device) for s in shapes],
        [torch.randn(3, *s, device=device) for s in shapes],
        torch.randn(9, 16, device=device),
        torch.randn(9, 24, device=device),
    )
    eager_w, eager_b = torch.zeros(16, 24, device=device), torch.zeros(16, device=device)
    comp_w, comp_b = eager_w.clone(), eager_b.clone()
    eager = _step(*args, eager_w, eager_b)
    compiled = torch.compile(_step, fullgraph=True, backend=compile_backend)(*args, comp_w, comp_b)
    assert torch.equal(eager[0], compiled[0])
    for e, c in zip(eager[1], compiled[1], strict=True):
        torch.testing.assert_close(e, c)
    torch.testing.assert_close(eager_w, comp_w)
    torch.testing.assert_close(eager_b, comp_b)


def test_ops_compose_with_torch_compile(cpp):
    _compare_compiled(CPU, "eager")


# ---------------------------------------------------------------------------------------------
# Triton on a CUDA GPU
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (no GPU here)")
def test_gpu_auto_picks_triton(cuda):
    shapes = [(1,), (7,), (31, 33), (4097,)]
    scores = random_scores(shapes, 2, cuda)
    auto = fk.topk_mask_batched(scores, 100)
    assert torch.equal(auto.words, fk.topk_mask_batched(scores, 100, backend="triton").words)
    assert "triton" in fk.available_backends(cuda)
    assert total_entries(shapes) == auto.num_entries
    assert all(backends.kernel(op, "auto", cuda) is getattr(torch.ops.fsmtl, op) for op in OPS)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (no GPU here)")
def test_gpu_torch_compile_fullgraph(cuda):
    _compare_compiled(cuda, "inductor")


# ---------------------------------------------------------------------------------------------
# Every Triton kernel compiles for a Hopper GPU (sm_90), checked on CPU
# ---------------------------------------------------------------------------------------------

#: (module, kernel, pointer element types, constexprs, warps or (warps, stages), 128-bit global
#: accesses expected): the variants the GPU paths launch. Other scalars are int64, ``scale`` fp32.
AOT_KERNELS = [
    ("topk_mask", "_sample_kernel", {"sample_ptr": "*fp32"},
     {"LOG_SEGMENTS": 3, "S_DTYPE": "bf16", "BLOCK": 1024}, 4, False),
    ("topk_mask", "_classify_kernel", {"sample_ptr": "*fp32", "cand_key_ptr": "*i32"},
     {"LOG_SEGMENTS": 3, "S_DTYPE": "fp32", "BLOCK": 2048, "ALIGNED": True}, 8, True),
    ("topk_mask", "_classify_kernel", {"sample_ptr": "*fp32", "cand_key_ptr": "*i32"},
     {"LOG_SEGMENTS": 0, "S_DTYPE": "fp16", "BLOCK": 4096, "ALIGNED": False}, 8, False),
    ("topk_mask", "_radix_pass_kernel", {"cand_key_ptr": "*i32"},
     {"READ_CANDIDATES": True, "LOG_SEGMENTS": 3, "S_DTYPE": "fp32", "BLOCK": 4096, "ALIGNED": True}, 8, True),
    ("topk_mask", "_radix_pass_kernel", {"cand_key_ptr": "*i32"},
     {"READ_CANDIDATES": False, "LOG_SEGMENTS": 2, "S_DTYPE": "bf16", "BLOCK": 64, "ALIGNED": False}, 4, False),
    ("topk_mask", "_tie_gather_kernel", {"cand_key_ptr": "*i32"}, {"BLOCK": 4096}, 8, False),
    ("topk_mask", "_tie_count_kernel", {"counts_ptr": "*i32"},
     {"LOG_SEGMENTS": 3, "S_DTYPE": "fp32", "BLOCK": 4096, "ALIGNED": True}, 8, True),
    ("topk_mask", "_mask_write_kernel", {"words_ptr": "*i32"},
     {"LOG_SEGMENTS": 3, "S_DTYPE": "fp16", "BLOCK": 4096, "ALIGNED": True}, 8, True),
    ("fisher_topk", "_sample_fisher_kernel", {"sample_ptr": "*fp32"},
     {"LOG_SEGMENTS": 2, "G_DTYPE": "bf16", "BLOCK": 1024}, 4, False),
    ("fisher_topk", "_fisher_classify_kernel", {"sample_ptr": "*fp32", "cand_key_ptr": "*i32"},
     {"LOG_SEGMENTS": 2, "G_DTYPE": "fp32", "BLOCK": 4096, "ALIGNED": True}, 8, True),
    ("fisher_accumulate", "_fisher_accumulate_kernel", {},
     {"LOG_SEGMENTS": 3, "G_DTYPE": "bf16", "BLOCK": 4096, "ALIGNED": True}, 8, True),
    ("masked_accumulate", "_masked_accumulate_kernel", {"row_ptr": "*i32"},
     {"LOG_SEGMENTS": 3, "G_DTYPE": "bf16", "A_DTYPE": "fp32", "BLOCK": 1024, "ALIGNED": True}, 4, True),
    ("masked_accumulate", "_masked_accumulate_tasks_kernel", {"words_ptr": "*i32"},
     {"LOG_SEGMENTS": 3, "G_DTYPE": "fp32", "A_DTYPE": "fp32", "BLOCK": 1024, "ALIGNED": True}, 4, True),
    ("masked_grad_average", "_masked_grad_average_kernel", {"words_ptr": "*i32"},
     {"SELECTED": True, "LOG_SEGMENTS": 3, "G_DTYPE": "fp32", "O_DTYPE": "bf16", "BLOCK": 1024, "ALIGNED": True},
     4, True),
    ("linear_fisher", "_linear_fisher_kernel",
     {"g_ptr": "*fp16", "a_ptr": "*fp32", "wf_ptr": "*fp32", "bf_ptr": "*fp32"},
     {"HAS_BIAS": True, "BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "STEPS": 1, "PRECISION": "tf32x3"},
     (8, 2), False),
    ("masked_matmul_accumulate", "_masked_matmul_accumulate_kernel",
     {"acc_ptr": "*fp32", "a_ptr": "*fp32", "b_ptr": "*fp32", "words_ptr": "*i32"},
     {"A_DTYPE": "fp32", "BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, 8, False),
]  # fmt: skip

AOT_SCRIPT = """
import importlib, json, sys
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

specs = json.loads(sys.argv[1])
for module, name, pointers, constexprs, options, vector in specs:
    fn = getattr(importlib.import_module("fsmtl_kernels.triton." + module), name)
    dtypes = {"fp32": tl.float32, "fp16": tl.float16, "bf16": tl.bfloat16}
    consts = {k: dtypes[v] if k.endswith("DTYPE") else v for k, v in constexprs.items()}
    signature = {}
    for arg in fn.arg_names:
        if arg in consts:
            signature[arg] = "constexpr"
        else:
            signature[arg] = pointers.get(arg, "*i64" if arg.endswith("_ptr") else "fp32" if arg == "scale" else "i64")
    warps, stages = options if isinstance(options, list) else (options, 3)
    kernel = triton.compile(ASTSource(fn, signature, consts), target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": warps, "num_stages": stages})
    ptx = kernel.asm["ptx"]
    assert not vector or ".global.v4" in ptx, f"{name}: no 128-bit global access (alignment hints lost)"
print("compiled", len(specs))
"""


def test_triton_kernels_compile_for_hopper():
    """Compiled (not interpreted) Triton rejects what the interpreter runs: non-constexpr globals,
    mismatched types in branches, unsupported casts. Each kernel variant the GPU paths launch is
    compiled to PTX for sm_90 here, without a GPU."""
    pytest.importorskip("triton")
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run(
        [sys.executable, "-c", AOT_SCRIPT, json.dumps(AOT_KERNELS)], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == f"compiled {len(AOT_KERNELS)}"
