#!/usr/bin/env bash
# One short GPU validation run: build, CUDA tests, GPU benchmark tables -> OUT_DIR/summary.md + results.json.
#
#   bash scripts/gpu_check.sh OUT_DIR [--dry-run]
#
# On a machine like the lent one (one H100/H200, no network, its own python3 with torch, Triton,
# transformers, peft, pytest preinstalled) it runs, each phase under its own time limit:
#   build  pip install --no-build-isolation --no-deps -e .  (the machine's torch; pip never resolves torch)
#   tests  pytest -m cuda on the device-parametrised tests, TRITON_INTERPRET=0 (kernels compiled for the card)
#   bench  python -m benchmarks.gpu (ceilings first, then the tables; docs/GPU.md)
# and renders OUT_DIR/summary.md from OUT_DIR/results.json. A phase that overruns its limit is stopped
# and reported as "cut"; the next phase still runs. Total wall time <= GPU_CHECK_TOTAL_S (480 s); budgets
# build 100 s, tests 150 s (+ what the build left), bench >= 200 s (everything left, minus 5 s for the report).
# Files in OUT_DIR: results.json, summary.md, build.log, tests.log, tests.xml, bench.log.
#
# --dry-run: CPU, TRITON_INTERPRET=1, tiny sizes, the same phases and code paths (the build is pip's
# --dry-run: metadata only, no compilation; the CUDA tests are collected and skip), < 2 minutes.
# Opacus (an exact peer of the Fisher table) is not on the lent machine: put its wheel in .whl/ (or
# GPU_CHECK_WHEELS=dir) and it is installed into a temporary directory first, offline.
# Environment: PYTHON (default python3), GPU_CHECK_{TOTAL,BUILD,TESTS,BENCH}_S (budgets, seconds),
# GPU_CHECK_PHASES (default build,tests,bench: a rerun may skip what already passed), GPU_CHECK_JOBS.
set -uo pipefail

if [ $# -lt 1 ] || [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
  sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
OUT=$1
DRY=0
if [ "${2:-}" = "--dry-run" ]; then DRY=1; elif [ -n "${2:-}" ]; then echo "unknown option: $2" >&2; exit 2; fi
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
START=$(date +%s)

if [ $DRY = 1 ]; then
  export TRITON_INTERPRET=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  TOTAL=${GPU_CHECK_TOTAL_S:-110}; BUILD=${GPU_CHECK_BUILD_S:-15}; TESTS=${GPU_CHECK_TESTS_S:-40}; BENCH=${GPU_CHECK_BENCH_S:-50}
  DRYFLAG=--dry-run
else
  export TRITON_INTERPRET=0
  TOTAL=${GPU_CHECK_TOTAL_S:-480}; BUILD=${GPU_CHECK_BUILD_S:-100}; TESTS=${GPU_CHECK_TESTS_S:-150}; BENCH=${GPU_CHECK_BENCH_S:-200}
  DRYFLAG=
fi
PHASES=",${GPU_CHECK_PHASES:-build,tests,bench},"
rm -f "$OUT/results.json" "$OUT/summary.md"

left() { echo $(( TOTAL - ($(date +%s) - START) )); }
# limit BUDGET [RESERVE]: BUDGET seconds, capped by what is left of the total minus RESERVE (the later
# phases' budgets) and 5 s for the report. Time a phase leaves unused passes on: the tests may use what
# the build left, the benchmarks get everything that is left.
limit() { local l; l=$(( $(left) - ${2:-0} - 5 )); [ "$1" -lt "$l" ] && l=$1; [ "$l" -lt 1 ] && l=1; echo "$l"; }
record() { "$PY" -m benchmarks.gpu.phases "$OUT" "$@" $DRYFLAG || echo "[gpu-check] could not record phase $1" >&2; }
want() { case "$PHASES" in *",$1,"*) return 0 ;; esac; record "$1" --rc skipped --note "not in GPU_CHECK_PHASES"; return 1; }

# carried wheels (Opacus): installed offline into a temporary directory, never touching torch
WHEELS=${GPU_CHECK_WHEELS:-.whl}
if [ -d "$WHEELS" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  SITE=$(mktemp -d)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$WHEELS"/*.whl \
    && export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" && echo "[gpu-check] wheels from $WHEELS"
fi

# ------------------------------------------------------------------------------------------- build
if want build; then
lim=$(limit "$BUILD" $(( TESTS + BENCH )))
echo "[gpu-check] build (limit $lim s)"
t0=$(date +%s)
if [ $DRY = 1 ]; then
  timeout "$lim" "$PY" -m pip install --dry-run --no-build-isolation --no-deps --no-index -e . >"$OUT/build.log" 2>&1
  rc=$?; note="dry run: pip --dry-run (metadata only; the C++ extension is not compiled)"
else
  EWC_FAST_BUILD_JOBS=${GPU_CHECK_JOBS:-$(nproc)} timeout "$lim" \
    "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . >"$OUT/build.log" 2>&1
  rc=$?; note="pip install --no-build-isolation --no-deps -e . (preinstalled torch)"
fi
record build --rc $rc --seconds $(( $(date +%s) - t0 )) --budget "$lim" --note "$note"
fi

# ------------------------------------------------------------------------------------------- tests
if want tests; then
TEST_PATHS="tests/ops tests/optim/test_optimizers.py tests/estimation/test_layers.py tests/estimation/test_conv_rule.py tests/estimation/test_hf.py tests/consolidation"
XDIST=
if [ $DRY = 0 ] && "$PY" -c "import xdist" 2>/dev/null; then XDIST="-n ${GPU_CHECK_JOBS:-8}"; fi
PER_TEST=
if "$PY" -c "import pytest_timeout" 2>/dev/null; then PER_TEST="--timeout=120"; fi
lim=$(limit $(( TOTAL )) $(( BENCH + 20 )))  # all that the bench budget leaves (and the 20 s kill grace)
[ "$lim" -gt $(( TESTS + BUILD )) ] && lim=$(( TESTS + BUILD ))
echo "[gpu-check] tests (limit $lim s) ${XDIST}"
t0=$(date +%s)
# shellcheck disable=SC2086
# SIGINT at the limit: pytest stops like on Ctrl-C and still writes the JUnit XML of the tests it ran
timeout -s INT -k 20 "$lim" "$PY" -m pytest -m cuda -q -rfE -p no:cacheprovider $XDIST $PER_TEST \
  --junitxml="$OUT/tests.xml" $TEST_PATHS >"$OUT/tests.log" 2>&1
rc=$?
[ $rc = 5 ] && [ $DRY = 1 ] && rc=0  # nothing selected is not an error of the script
record tests --rc $rc --seconds $(( $(date +%s) - t0 )) --budget "$lim" --junit "$OUT/tests.xml" \
  --note "pytest -m cuda, TRITON_INTERPRET=$TRITON_INTERPRET ${XDIST}"
fi

# ------------------------------------------------------------------------------------------- bench
if want bench; then
lim=$(limit $(( TOTAL )))  # everything that is left
echo "[gpu-check] bench (limit $lim s)"
t0=$(date +%s)
inner=$(( lim > 20 ? lim - 10 : lim ))  # the tables' own budget: they stop between rows before the hard limit
# shellcheck disable=SC2086
timeout -k 10 "$lim" "$PY" -m benchmarks.gpu --out "$OUT" --budget-s "$inner" $DRYFLAG >"$OUT/bench.log" 2>&1
rc=$?
record bench --rc $rc --seconds $(( $(date +%s) - t0 )) --budget "$lim" --note "python -m benchmarks.gpu"
fi

# ------------------------------------------------------------------------------------------ report
"$PY" -m benchmarks.gpu.report "$OUT" >/dev/null
echo "[gpu-check] done in $(( $(date +%s) - START )) s: $OUT/summary.md"
grep -A12 '^## Targets' "$OUT/summary.md" || true
