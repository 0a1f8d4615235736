"""The device check (benchmarks/gpu_check.sh, gpu_check.py, gpu_bandwidth.py) on CPU: the goal
summary on the committed H100 results and on made-up results, the exit status, and every
measurement of the bandwidth script run once on CPU tensors (Triton interpreted)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


gpu_check = load("gpu_check")


def statuses(goals) -> dict[str, str]:
    return {f"{g.group}: {g.goal}": g.status for g in goals}


def test_dry_run_summarises_the_committed_h100_results():
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(BENCH / "gpu_check.sh"), "--dry-run"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "MISSED  top-K: k=10% fp32 <= 0.4 ms" in out and "3.1322 ms" in out
    assert "MET  tests: GPU tests (pytest -m gpu) pass" in out and "97 passed" in out
    assert "no row masked_accumulate[float32]" in out  # not measured on 2026-11-25
    assert out.rstrip().endswith("10 met, 25 missed, 11 unmeasured")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_without_a_gpu_the_check_fails_loudly():
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(BENCH / "gpu_check.sh")], capture_output=True, text=True, env=env)
    assert proc.returncode == 1 and "sees no CUDA device" in proc.stderr
    proc = subprocess.run(["bash", str(BENCH / "gpu_check.sh"), "--bogus"], capture_output=True, text=True, env=env)
    assert proc.returncode == 2 and "unknown argument" in proc.stderr


def test_part_runner_records_failures_and_timeouts():
    proc = subprocess.run(["bash", str(BENCH / "gpu_check.sh"), "--self-test"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "stand-in ran" in proc.stdout and "(TIMED OUT)" in proc.stdout
    assert proc.stdout.strip().endswith("FAILED parts: failure timeout")


STAND_IN = """#!/usr/bin/env bash
# python3 on a GPU machine, played on CPU: answers the check's GPU questions, fakes its GPU parts.
case "$*" in
  *torch.cuda.is_available*) exit 0 ;;
  *"get_device_name(0).lower()"*) echo h100 ;;
  *"get_device_name(0), 'torch'"*) echo "NVIDIA H100 (stand-in)" ;;
  "-m pip "*|*"import fsmtl, fsmtl_kernels.triton"*) echo "stand-in: $1 $2" ;;
  *"import xdist"*) exit 1 ;;
  "-m pytest "*) echo "4 passed, 1 skipped in 1.00s" ;;
  *gpu_bandwidth.py*) echo '{"rows": [{"kernel": "topk_mask[k=10%]", "P": 100000000, "ms": 0.3}]}' > "${@: -1}" ;;
  *step_table.py*) echo 'mlp 2 64 {"floor": {"ms": 10.0}, "fsmtl-auto": {"ms": 10.5}}'; echo "killed" >&2; exit 1 ;;
  *) exec PYTHON "$@" ;;
esac
"""


def test_the_check_end_to_end_with_a_stand_in_gpu(tmp_path):
    """The real run's orchestration (parts, file names, summary, $OUT, exit status) with a stand-in
    python3 that fakes the GPU parts; the step table fails, so the check must exit 1 naming it."""
    stand_in = tmp_path / "python3"
    stand_in.write_text(STAND_IN.replace("PYTHON", sys.executable))
    stand_in.chmod(0o755)
    results, out = tmp_path / "results", tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, PYTHON=str(stand_in), GPU_CHECK_RESULTS=str(results), OUT=str(out))
    proc = subprocess.run(["bash", str(BENCH / "gpu_check.sh")], capture_output=True, text=True, env=env)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "== step: exit 1" in proc.stdout and "FAILED parts of the check: step" in proc.stdout
    assert "MET  top-K: k=10% fp32 <= 0.4 ms" in proc.stdout
    assert "MET  step: mlp T=2 FSMTL <= 1.10x floor" in proc.stdout  # the row it printed before it stopped
    kinds = sorted(p.suffix if p.suffix == ".log" else p.name.split("-")[-1] for p in out.iterdir())
    assert kinds == [".log", "bandwidth.json", "step.txt", "summary.json", "tests.txt"]
    summary = json.loads(next(results.glob("*-summary.json")).read_text())
    assert summary["failed_parts"] == ["step"]


def fake_bandwidth() -> dict:
    rows = [
        {"kernel": "fisher_accumulate[float32]", "P": 10**8, "ratio_to_copy": 0.9},
        {"kernel": "fisher_accumulate[bfloat16]", "P": 10**8, "ratio_to_copy": 0.8},
        {"kernel": "masked_accumulate[float32]", "error": "CompilationError: boom"},
        {"kernel": "fisher_accumulate[float32]", "P": 10**7, "ratio_to_copy": 0.1},  # not the largest P
        {
            "kernel": "linear_fisher[64x64x64]",
            "P": 4096,
            "speedup_vs_cublas_squared": 1.2,
            "rel_error": 3e-7,
            "cublas_rel_error": 2e-7,
        },  # fmt: skip
    ]
    for ratio, ms, fp16_ms in ((10, 0.3, 0.2), (50, 0.5, 0.6), (90, 0.35, 0.35)):
        rows.append({"kernel": f"topk_mask[k={ratio}%]", "P": 10**8, "ms": ms, "one_read_ms": 0.13,
                     "speedup_vs_torch_topk_cat": 3.4 / ms})  # fmt: skip
        rows.append({"kernel": f"topk_mask[k={ratio}%,float16]", "P": 10**8, "ms": fp16_ms})
    return {"device": "NVIDIA H100 80GB HBM3", "rows": rows}


def fake_step() -> list:
    def res(auto, floor, upgrad, extra):
        info = {"P": 1_000_000, "largest": 250_000}
        return {
            "floor": {"ms": floor, "peak_mib": 10.0, **info},
            "fsmtl-auto": {"ms": auto, "peak_mib": 10.0 + extra, **info},
            "torchjd-upgrad": {"ms": upgrad, **info} if upgrad else {"error": "ModuleNotFoundError: torchjd"},
            "dense": {"ms": 4.0},
            "partial-top2": {"ms": 5.0},
            "mask-forward": {"ms": 10.0},
            "mask-forward-loop": {"ms": 10.0},
        }

    return [
        {"model": "mlp", "T": 2, "results": res(10.5, 10.0, 12.0, 3.0)},
        {"model": "mlp", "T": 8, "results": res(12.0, 10.0, None, 100.0)},
    ]


def test_goals_met_missed_and_unmeasured():
    goals = gpu_check.evaluate(fake_bandwidth(), fake_step(), "5 passed, 1 skipped in 3s", 300.0, 390.0)
    got = statuses(goals)
    assert got["tests: GPU tests (pytest -m gpu) pass"] == "met"
    assert got["top-K: k=10% fp32 <= 0.4 ms"] == "met"
    assert got["top-K: k=50% fp32 <= 0.4 ms"] == "missed"
    assert got["top-K: k=10% >= 30% of one read"] == "met"  # 0.13 / 0.3 = 43%
    assert got["top-K: k=10% >= 8x torch.topk"] == "met"  # 3.4 / 0.3 = 11x
    assert got["top-K: k=50% >= 8x torch.topk"] == "missed" and got["top-K: k=50% >= 30% of one read"] == "missed"
    assert got["top-K: k=10% float16 no slower than fp32"] == "met"
    assert got["top-K: k=50% float16 no slower than fp32"] == "missed"
    assert got["top-K: k=90% float16 no slower than fp32"] == "met"  # as fast
    assert got["top-K: k=10% bfloat16 no slower than fp32"] == "unmeasured"
    assert got["bandwidth: Fisher accumulation float32 >= 85% of copy"] == "met"  # P = 1e8 row, not 1e7
    assert got["bandwidth: Fisher accumulation bfloat16 >= 85% of copy"] == "missed"
    measured = {f"{g.group}: {g.goal}": g.measured for g in goals}
    assert "CompilationError" in measured["bandwidth: masked_accumulate float32 >= 85% of copy"]
    assert got["linear_fisher: no slower than cuBLAS on squared operands, same accuracy"] == "met"
    assert got["step: mlp T=2 FSMTL <= 1.10x floor"] == "met"
    assert got["step: mlp T=2 FSMTL no slower than torchjd UPGrad"] == "met"
    assert got["step: mlp T=2 FSMTL extra memory within P + T x largest"] == "met"  # +3 within 5.7 MiB
    assert got["step: mlp T=8 FSMTL <= 1.10x floor"] == "missed"
    assert got["step: mlp T=8 FSMTL no slower than torchjd UPGrad"] == "unmeasured"
    assert "torchjd" in measured["step: mlp T=8 FSMTL no slower than torchjd UPGrad"]
    assert got["step: mlp T=8 FSMTL extra memory within P + T x largest"] == "missed"
    assert got["step: mlp T=8 partial top-2 <= 1.5x dense"] == "met"
    assert got["step: mlp T=8 mask_forward <= 1.05x its loop"] == "met"
    assert got["step: cnn T=40 FSMTL <= 1.10x floor"] == "unmeasured"
    assert got["check: within its budget (390 s)"] == "met"


def test_linear_fisher_needs_the_same_accuracy():
    rows = {"linear_fisher[8x8x8]": {"speedup_vs_cublas_squared": 2.0, "rel_error": 1e-5, "cublas_rel_error": 1e-7}}
    assert gpu_check.linear_goal(rows).status == "missed"


def test_exit_status_names_failed_parts_and_tests(tmp_path, capsys):
    bandwidth = tmp_path / "b.json"
    bandwidth.write_text(json.dumps(fake_bandwidth()))
    tests = tmp_path / "t.txt"
    tests.write_text("....F\n1 failed, 4 passed in 2.0s\n")
    summary = tmp_path / "s.json"
    args = ["--bandwidth", str(bandwidth), "--tests", str(tests), "--elapsed", "10", "--json", str(summary)]
    assert gpu_check.main(args) == 1
    assert "FAILED: the GPU tests did not all pass" in capsys.readouterr().out
    tests.write_text("4 passed in 2.0s\n")
    assert gpu_check.main([*args, "--failed", "step"]) == 1
    assert "FAILED parts of the check: step" in capsys.readouterr().out
    assert json.loads(summary.read_text())["failed_parts"] == ["step"]
    assert gpu_check.main(args) == 0


def test_bandwidth_script_measures_every_kernel_on_cpu(tmp_path):
    """Each measurement of gpu_bandwidth.py once, on CPU tensors with Triton interpreted (tiny sizes)."""
    out = tmp_path / "bw.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, str(BENCH / "gpu_bandwidth.py"), "--device", "cpu", "--sizes", "80000", "--repeats", "1"]
    cmd += ["--warmup", "0", "--dtypes", "float32", "--ratios", "0.5", "--linear-size", "32", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = {r["kernel"]: r for r in json.loads(out.read_text())["rows"]}
    expected = ["fisher_accumulate[float32]", "masked_grad_average[T=3,float32]", "masked_accumulate[float32]"]
    expected += ["topk_mask[k=50%]", "fisher_topk[k=50%]", "linear_fisher[32x32x32]"]
    for name in expected:
        assert name in rows and "error" not in rows[name], name
    assert {"ratio_to_copy", "copy_gbps"} <= rows["masked_accumulate[float32]"].keys()
    assert {"op_ms", "one_read_ms", "route", "speedup_vs_torch_topk_cat"} <= rows["topk_mask[k=50%]"].keys()
    assert {"rel_error", "cublas_rel_error", "speedup_vs_cublas_squared"} <= rows["linear_fisher[32x32x32]"].keys()
    assert rows["linear_fisher[32x32x32]"]["rel_error"] < 1e-5
