#!/usr/bin/env bash
# The one prepared device check: on a bare machine with one CUDA GPU (an H100 or H200), from a copy
# of the working tree, install the project, run the GPU tests, the bandwidth table and the step
# table, and print every GPU goal met / missed (benchmarks/gpu_check.py). Each part has its own
# time limit and the whole stays within GPU_CHECK_BUDGET seconds (390 by default) so that it runs
# twice in 15 minutes of lent device time, the machine's start included.
#
# Usage:
#   bash benchmarks/gpu_check.sh            # on the GPU machine (the `run` tool: carry .whl)
#   bash benchmarks/gpu_check.sh --dry-run  # anywhere: the summary on the committed H100 results
#   bash benchmarks/gpu_check.sh --self-test  # anywhere: the part runner on stand-in commands
#
# Writes benchmarks/results/gpu-check-<gpu>-<date>-{tests.txt,bandwidth.json,step.json,step.txt,summary.json}
# (GPU_CHECK_RESULTS names another folder) and copies them, with the whole log, into $OUT when it
# is set (the device tool returns $OUT).
# Wheels in .whl/ (torchjd, qpsolvers, quadprog for Python 3.12; the machine has no network) are
# installed first: without them the step table's torchjd column is an error and its goals are
# unmeasured. Exit status 1 when a part failed or timed out or a GPU test failed (stated loudly in
# the summary); missed goals are results, not failures.
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET:-390}
RESULTS=${GPU_CHECK_RESULTS:-benchmarks/results}
DRY=0
SELF_TEST=0
for arg in "$@"; do
  case $arg in
    --dry-run) DRY=1 ;;
    --self-test) SELF_TEST=1 ;;
    -h | --help) awk 'NR > 1 && /^#/ { print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$arg' (try --help)" >&2; exit 2 ;;
  esac
done
START=$(date +%s)
FAILED=()

# part NAME LIMIT CMD...: runs CMD (a program, or one of the functions below through
# `bash -c NAME`) under `timeout`, and records NAME as failed on a nonzero exit or a timeout.
part() {
  local name=$1 limit=$2 t0 rc
  shift 2
  t0=$(date +%s)
  echo "== $name (limit ${limit}s, $((t0 - START))s into the check) =="
  timeout -k 10 "$limit" "$@"
  rc=$?
  echo "== $name: exit $rc after $(($(date +%s) - t0))s$([ $rc = 124 ] && echo ' (TIMED OUT)')"
  [ $rc = 0 ] || FAILED+=("$name")
}

if [ "$SELF_TEST" = 1 ]; then
  # The part runner on stand-ins: a function, a failure and a timeout (checked on CPU by the tests).
  stand_in() { echo "stand-in ran"; }
  export -f stand_in
  part function 5 bash -c stand_in
  part failure 5 bash -c "exit 3"
  part timeout 1 sleep 5
  echo "FAILED parts: ${FAILED[*]:-}"
  exit 0
fi

if [ "$DRY" = 1 ]; then
  exec "$PY" benchmarks/gpu_check.py --label "dry run: the 2026-11-25 H100 results, not a new measurement" \
    --bandwidth benchmarks/results/gpu-bandwidth-h100-2026-11-25.json \
    --step benchmarks/results/step-table-h100-2026-11-25.json \
    --tests benchmarks/results/gpu-tests-h100-2026-11-25.txt --elapsed 0 --budget "$BUDGET"
fi

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check.sh: FAILED: $PY sees no CUDA device; nothing was measured" >&2
  exit 1
fi
GPU=$("$PY" -c "import torch; n = torch.cuda.get_device_name(0).lower(); print(next((g for g in ('h200', 'h100', 'a100') if g in n), 'gpu'))")
TAG="gpu-check-$GPU-$(date -u +%Y-%m-%d-%H%M)"
LOG="$RESULTS/$TAG.log"
mkdir -p "$RESULTS"
exec > >(tee "$LOG") 2>&1
echo "gpu_check.sh: $(date -u +%FT%TZ), $("$PY" -c "import torch, triton; print(torch.cuda.get_device_name(0), 'torch', torch.__version__, 'triton', triton.__version__)"), budget ${BUDGET}s"
export PY RESULTS TAG

install() {
  if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile .whl/*.whl || return 1
  else
    echo "WARNING: no .whl/ carried: torchjd is not installed, so the step table's UPGrad goals stay unmeasured"
  fi
  # The C++ extension serves CPU tensors only; the GPU paths are Triton (no build).
  FSMTL_BUILD_CPP=0 "$PY" -m pip install -q --no-build-isolation --no-deps -e . || return 1
  "$PY" -c "import fsmtl, fsmtl_kernels.triton as t, torch; assert t.unavailable_reason(torch.device('cuda')) is None; print('fsmtl', fsmtl.__file__)"
}

gpu_tests() {
  set -o pipefail
  local workers=()
  "$PY" -c "import xdist" 2> /dev/null && workers=(-n 4)  # compiles Triton kernels in parallel
  "$PY" -m pytest -m gpu -q -p no:cacheprovider --continue-on-collection-errors "${workers[@]}" tests \
    2>&1 | tee "$RESULTS/$TAG-tests.txt"
}

step_table() {
  set -o pipefail
  local methods=dense,floor,fsmtl-seq,fsmtl-batched,fsmtl-auto,partial-top2,mask-forward,mask-forward-loop
  PYTHONUNBUFFERED=1 "$PY" benchmarks/step_table.py --device cuda --repeats 10 --batch-t40-cnn 64 \
    --methods "$methods,torchjd-upgrad" --out "$RESULTS/$TAG-step.json" 2>&1 | tee "$RESULTS/$TAG-step.txt"
}

export -f install gpu_tests step_table
# Limits: 50 + 115 + 85 + 100 s, plus 10 s of grace each for a part that ignores SIGTERM = 390 s.
part install 50 bash -c install
part tests 115 bash -c gpu_tests
part bandwidth 85 "$PY" benchmarks/gpu_bandwidth.py --check --json "$RESULTS/$TAG-bandwidth.json"
part step 100 bash -c step_table

echo "== summary ($(($(date +%s) - START))s into the check) =="
"$PY" benchmarks/gpu_check.py --label "$TAG" --bandwidth "$RESULTS/$TAG-bandwidth.json" \
  --step "$RESULTS/$TAG-step.json" --step-log "$RESULTS/$TAG-step.txt" --tests "$RESULTS/$TAG-tests.txt" \
  --elapsed $(($(date +%s) - START)) \
  --budget "$BUDGET" --failed "${FAILED[*]:-}" --json "$RESULTS/$TAG-summary.json"
STATUS=$?
if [ -n "${OUT:-}" ]; then
  cp "$RESULTS/$TAG"* "$OUT"/ 2> /dev/null
  echo "copied $(ls "$RESULTS/$TAG"* | wc -l) files of $TAG into \$OUT"
fi
exit $STATUS
