#!/usr/bin/env bash
# Build the C++ extension ewc_fast._C with AddressSanitizer + UndefinedBehaviorSanitizer and run the op
# tests (tests/ops, C++ and torch backends) against it.
#
# The sanitized build lives in build/sanitize/ (its own build dir and a copy of the package); the
# in-place extension of the working tree is not touched. The sanitizer runtimes are preloaded into
# Python (LD_PRELOAD), leak detection is off (CPython and torch keep allocations until exit), and the
# first error aborts the run (halt_on_error, -fno-sanitize-recover). Extra arguments go to pytest.
#
#   bash scripts/sanitize.sh                  # ~5 min build + ~5 min tests on 2 cores
#   bash scripts/sanitize.sh -k penalty -x    # a subset
#   SANITIZE_REUSE=1 bash scripts/sanitize.sh # rerun the tests on the existing sanitized build
#
# Needs gcc/g++ with libasan and libubsan (any recent GCC) and the dev extra (pybind11, pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=build/sanitize

ROOT=$PWD
PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")
if [ "${SANITIZE_REUSE:-0}" != 1 ]; then
    rm -rf "$OUT"
    mkdir -p "$OUT"
    EWC_FAST_SANITIZE=1 "$PY" setup.py -q build_ext --build-temp "$OUT/tmp" --build-lib "$OUT/lib"
fi
rm -rf "$OUT/pkg" "$OUT/run"
mkdir -p "$OUT/pkg" "$OUT/run"
cp -r ewc_fast "$OUT/pkg/ewc_fast"
rm -f "$OUT"/pkg/ewc_fast/_C*.so
cp -r kernels "$OUT/pkg/ewc_fast/kernels"
cp "$OUT"/lib/ewc_fast/_C*.so "$OUT/pkg/ewc_fast/"

CXX=${CXX:-g++}
export LD_PRELOAD="$($CXX -print-file-name=libasan.so) $($CXX -print-file-name=libubsan.so)"
export ASAN_OPTIONS=detect_leaks=0:halt_on_error=1:abort_on_error=1:alloc_dealloc_mismatch=0:detect_odr_violation=0
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
export PYTHONPATH="$ROOT/$OUT/pkg"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

# run from an empty directory: python puts the working directory first on sys.path, and the tests must
# load the sanitized copy, not the working tree's package
cd "$OUT/run"
"$PY" -c "
import ewc_fast._C as c, sys
assert '$OUT/pkg' in c.__file__, c.__file__
print('sanitized extension:', c.__file__)
"
# append mode: the copy in build/sanitize/pkg stays ahead of the working tree (needed for `tests`) on sys.path
"$PY" -m pytest --rootdir "$ROOT" -c "$ROOT/pyproject.toml" --import-mode=append -p no:cacheprovider -q \
    "$ROOT/tests/ops" -k "not triton" "$@"
