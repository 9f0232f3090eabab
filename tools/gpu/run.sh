#!/usr/bin/env bash
# The GPU check in one command, from the repository root on the device machine (tools/gpu/NOTES.md has
# the exact `run` call): environment and the two ceilings (copy bandwidth, bf16 GEMM rate); the carried
# wheels installed into a target directory; the extension built in place for sm_90; the cuda tests with a
# per-test timeout; one benchmark file (bench/gpu/bench_gpu.py) against the peers; a summary table last.
# Every stage logs its time and exit code, and a failed or timed-out stage never stops the next one.
#
#   tools/gpu/run.sh                 on the GPU machine ($OUT: where logs and JSON go; default a temp dir)
#   tools/gpu/run.sh --cpu-dry-run   the same stages on the CPU at tiny sizes: no CUDA build (the CPU
#                                    extension must already be built), Triton under TRITON_INTERPRET=1
#   --only env,wheels,build,tests,bench   run a subset (a rerun of what failed); summary always runs
#
# Files under $OUT (flat, all 8 of the device tool's limit): run.log (all of stdout), env.json, build.log,
# tests.log, tests-junit.xml, bench.log, bench.json, and summary.json (stages, ceilings, targets).
# Environment: PYTHON (default python3), WHEEL_DIR (default .whl), FASTCURV_GPU_BUDGET_S (whole run:
# default 460 s on the GPU; 1200 s in the dry run, whose stage caps are 3x the GPU's for a loaded 2-core
# machine), FASTCURV_TEST_TIMEOUT_S (per test, default 60 s), FASTCURV_TEST_WORKERS (pytest-xdist
# workers on the GPU, default 6), FASTCURV_TEST_K (pytest -k for the GPU tests, default cuda).
set -uo pipefail # no -e: a failing stage is recorded, and the next stage runs
cd "$(dirname "$0")/../.."
REPO=$PWD

DRY=0
ONLY="env,wheels,build,tests,bench"
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-dry-run) DRY=1 ;;
    --only) ONLY=$2; shift ;;
    --only=*) ONLY=${1#--only=} ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "run.sh: unknown argument $1 (expected --cpu-dry-run, --only STAGES)" >&2; exit 2 ;;
  esac
  shift
done

if [ -z "${OUT:-}" ]; then
  OUT=$(mktemp -d "${TMPDIR:-/tmp}/fastcurv-gpu-run.XXXXXX")
  echo "run.sh: OUT was not set; writing to $OUT"
fi
mkdir -p "$OUT"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/fastcurv-gpu-work.XXXXXX") # scratch: kept out of $OUT (8-file limit)
trap 'rm -rf "$WORK"' EXIT
exec > >(tee -a "$OUT/run.log") 2>&1

PYTHON=${PYTHON:-python3}
WHEEL_DIR=${WHEEL_DIR:-.whl}
SITE=$WORK/site
export PYTHONPATH="$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
if [ "$DRY" = 1 ]; then
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
  BUDGET=${FASTCURV_GPU_BUDGET_S:-1200}
  CAP_SCALE=3 # a loaded 2-core machine: the caps are for the GPU machine's 16 cores
  MODE=cpu-dry-run
else
  BUDGET=${FASTCURV_GPU_BUDGET_S:-460}
  CAP_SCALE=1
  MODE=gpu
fi
TEST_TIMEOUT=${FASTCURV_TEST_TIMEOUT_S:-60}
STAGES_TSV=$WORK/stages.tsv
: >"$STAGES_TSV"
T0=$(date +%s)
echo "run.sh: mode $MODE, budget ${BUDGET}s, OUT=$OUT, $(date -u +%FT%TZ), git $(git rev-parse --short HEAD 2>/dev/null || echo '?')"

wanted() { [[ ",$ONLY," == *",$1,"* ]]; }

# stage NAME CAP RESERVE CMD...: runs CMD under `timeout`, limit = min(CAP, what the budget leaves after
# RESERVE seconds kept for the later stages); records "name rc seconds limit" in $STAGES_TSV.
stage() {
  local name=$1 cap=$(($2 * CAP_SCALE)) reserve=$(($3 * CAP_SCALE))
  shift 3
  local left=$((BUDGET - ($(date +%s) - T0) - reserve))
  local limit=$((cap < left ? cap : left))
  ((limit < 10)) && limit=10
  echo
  echo "=== stage $name: start (limit ${limit}s, $(($(date +%s) - T0))s into the run) ==="
  local start rc
  start=$(date +%s.%N)
  if [ "$(type -t "$1")" = function ]; then # a stage function of this file (exported below)
    timeout -k 10 "$limit" bash -c "$*"
  else
    timeout -k 10 "$limit" "$@"
  fi
  rc=$?
  local secs
  secs=$(awk "BEGIN{printf \"%.1f\", $(date +%s.%N) - $start}")
  local why=""
  [ "$rc" = 124 ] || [ "$rc" = 137 ] && why=" (TIMED OUT at ${limit}s)"
  echo "=== stage $name: rc=$rc$why, ${secs}s ==="
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$secs" "$limit" >>"$STAGES_TSV"
  return 0
}

# ------------------------------------------------------------------------------------------------ build
# Started first, in the background (CPU-bound, 16 cores), while the env stage measures the GPU.
# GPU: the sources built in place for sm_90 with all cores; if that fails, a prebuilt extension carried in
# .gpu-prebuilt/ (tools/gpu/prebuild.sh, built against the same torch 2.11+cu130) is used when its source
# hash matches. Dry run: no CUDA build; checks that the CPU extension loads.
build_stage() {
  if [ "$DRY" = 1 ]; then
    echo "dry run: no CUDA build; the CPU extension must load:"
    "$PYTHON" -c "import fastcurv, fastcurv._backend as b; assert b.has_extension(), b._C_ERROR; print('fastcurv._C loads; backends', fastcurv.available())"
    return
  fi
  echo "nvcc: $(command -v nvcc || echo 'not on PATH'); CUDA_HOME=${CUDA_HOME:-unset}"
  local start rc
  start=$(date +%s)
  env TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 FASTCURV_FORCE_CUDA=1 CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" \
    "$PYTHON" setup.py build_ext --inplace --build-temp "$WORK/build"
  rc=$?
  echo "source build: rc=$rc, $(($(date +%s) - start))s (TORCH_CUDA_ARCH_LIST=9.0, MAX_JOBS=16)"
  if [ "$rc" != 0 ]; then
    if bash tools/gpu/prebuild.sh --install-carried; then
      echo "using the carried prebuilt extension instead"
    else
      echo "no usable prebuilt extension either: the cuda backend's tests will skip, Triton's still run"
      return 1
    fi
  fi
  "$PYTHON" - <<'PY'
import torch, fastcurv, fastcurv._backend as b
assert b.has_extension(), f"fastcurv._C does not load: {b._C_ERROR}"
assert b.has_cuda_kernels(), "fastcurv._C has no CUDA kernels"
print("fastcurv._C loads with CUDA kernels; backends", fastcurv.available(), "; torch", torch.__version__)
PY
}

export DRY PYTHON OUT WORK SITE WHEEL_DIR TEST_TIMEOUT REPO
export -f build_stage
BUILD_PID=""
if wanted build; then
  # its own process group (setsid), so that a build past its time is stopped with all of nvcc's children
  SETSID=$(command -v setsid || true)
  $SETSID bash -c 'build_stage; echo $? >"$WORK/build.rc"' >"$OUT/build.log" 2>&1 &
  BUILD_PID=$!
  BUILD_START=$(date +%s.%N)
fi

# ------------------------------------------------------------------------------------------------ env
if wanted env; then
  stage env 90 300 "$PYTHON" tools/gpu/env_probe.py --out "$OUT/env.json" $([ "$DRY" = 1 ] && echo --cpu-dry-run)
fi

# ------------------------------------------------------------------------------------------------ wheels
# Carried pure-Python peers (opacus, BackPACK, curvlinops, PyHessian) into $SITE, first on PYTHONPATH;
# --no-deps and check_wheels.py's refusal of torch/triton/nvidia wheels keep the image's torch in place.
wheels_stage() {
  if ! ls "$WHEEL_DIR"/*.whl >/dev/null 2>&1; then
    echo "no wheels in $WHEEL_DIR (run tools/gpu/fetch_wheels.sh here and carry .whl): the peers that the image lacks are skipped"
    return 0
  fi
  "$PYTHON" tools/gpu/check_wheels.py "$WHEEL_DIR" || return 1
  "$PYTHON" -m pip install -q --isolated --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEEL_DIR"/*.whl || return 1
  "$PYTHON" - <<'PY'
import importlib, torch
print("torch still", torch.__version__, "from", torch.__file__)
for name in ("opacus", "backpack", "curvlinops", "pyhessian", "unfoldNd", "einconv"):
    try:
        module = importlib.import_module(name)
        print(f"  {name:<11} {getattr(module, '__version__', '?'):<10} {module.__file__}")
    except Exception as err:  # a peer that fails to import is skipped by the benchmark, with this reason
        print(f"  {name:<11} IMPORT FAILED: {type(err).__name__}: {err}")
PY
}
export -f wheels_stage
if wanted wheels; then
  stage wheels 60 280 wheels_stage
fi

if [ -n "$BUILD_PID" ]; then
  echo
  echo "=== stage build: waiting for the background build (log: build.log) ==="
  left=$((BUDGET - ($(date +%s) - T0) - 240 * CAP_SCALE))
  ((left < 30)) && left=30
  waited=0
  while kill -0 "$BUILD_PID" 2>/dev/null && ((waited < left)); do sleep 1; waited=$((waited + 1)); done
  if kill -0 "$BUILD_PID" 2>/dev/null; then
    if [ -n "$SETSID" ]; then kill -TERM -- "-$BUILD_PID" 2>/dev/null; else kill -TERM "$BUILD_PID" 2>/dev/null; fi
    echo "build still running after waiting ${left}s: stopped" >>"$OUT/build.log"
    build_rc=124
  else
    wait "$BUILD_PID" 2>/dev/null
    build_rc=$(cat "$WORK/build.rc" 2>/dev/null || echo 1)
  fi
  secs=$(awk "BEGIN{printf \"%.1f\", $(date +%s.%N) - $BUILD_START}")
  tail -n 15 "$OUT/build.log"
  echo "=== stage build: rc=$build_rc, ${secs}s (started at 0s, in the background) ==="
  printf '%s\t%s\t%s\t%s\n' build "$build_rc" "$secs" "$left" >>"$STAGES_TSV"
fi

# ------------------------------------------------------------------------------------------------ tests
# GPU: every test whose id says cuda (the `device` fixture's cuda parameter: ops and backends vs the
# float64 oracle in fp32/bf16/fp16, opcheck, gradcheck/gradgradcheck, int64-indexed large shapes,
# non-contiguous inputs, capture, regularizers, curvature). Dry run: the same selection is collected (all
# skip without a GPU), then a small CPU subset of the same files runs.
tests_stage() {
  local timeout_args
  if "$PYTHON" -c "import pytest_timeout" 2>/dev/null; then
    timeout_args=(--timeout="$TEST_TIMEOUT")
  else
    echo "pytest-timeout is not installed: using tools/gpu/pytest_timeout_fallback.py"
    timeout_args=(-p pytest_timeout_fallback --fallback-timeout="$TEST_TIMEOUT")
  fi
  local common=(-q -rfE -o addopts= -p no:cacheprovider "${timeout_args[@]}" --junitxml="$OUT/tests-junit.xml")
  if [ "$DRY" = 1 ]; then
    echo "--- the GPU selection (-k ${FASTCURV_TEST_K:-cuda}), collected and skipped here:"
    "$PYTHON" -m pytest tests -k "${FASTCURV_TEST_K:-cuda}" -q -o addopts= -p no:cacheprovider "${timeout_args[@]}" | tail -n 3
    local rc_gpu=${PIPESTATUS[0]}
    echo "--- a CPU subset of the same tests:"
    "$PYTHON" -m pytest tests/test_ops.py tests/test_triton.py tests/test_gpu_large.py \
      -k "cpu and (opcheck or gradcheck or non_contiguous or noncontiguous or large or float16 or degenerate)" "${common[@]}"
    local rc_cpu=$?
    return $((rc_gpu != 0 || rc_cpu != 0))
  fi
  local xdist=()
  if "$PYTHON" -c "import xdist" 2>/dev/null; then
    xdist=(-n "${FASTCURV_TEST_WORKERS:-6}")
  fi
  "$PYTHON" -m pytest tests -k "${FASTCURV_TEST_K:-cuda}" "${common[@]}" "${xdist[@]}"
}
export -f tests_stage
if wanted tests; then
  export PYTHONPATH="$REPO/tools/gpu:$PYTHONPATH" # for -p pytest_timeout_fallback
  stage tests 240 130 tests_stage >"$OUT/tests.log" 2>&1
  tail -n 25 "$OUT/tests.log" # ends with the stage's own "=== stage tests: rc=..." line
fi

# ------------------------------------------------------------------------------------------------ bench
if wanted bench; then
  stage bench 180 15 "$PYTHON" bench/gpu/bench_gpu.py --out "$OUT/bench.json" $([ "$DRY" = 1 ] && echo --cpu-dry-run) >"$OUT/bench.log" 2>&1
  tail -n 40 "$OUT/bench.log"
fi

# ------------------------------------------------------------------------------------------------ summary
echo
"$PYTHON" tools/gpu/summarize.py --stages "$STAGES_TSV" --env "$OUT/env.json" --bench "$OUT/bench.json" \
  --mode "$MODE" --total "$(($(date +%s) - T0))" --out "$OUT/summary.json"
summary_rc=$?
failed=$(awk -F'\t' '$2 != 0 {print $1}' "$STAGES_TSV" | tr '\n' ' ')
echo "run.sh: $(($(date +%s) - T0))s in all; files in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
if [ -n "$failed" ] || [ "$summary_rc" != 0 ]; then
  echo "run.sh: FAILED stages: ${failed:-summary}"
  exit 1
fi
echo "run.sh: every stage passed"
