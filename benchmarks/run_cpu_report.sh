#!/usr/bin/env bash
# Regenerates benchmarks/results/RESULTS.md (+ RESULTS.json) on a CPU machine, as recorded there:
# three serial runs of the comparison driver, each pinned to one core with one torch thread, then
# one merge that re-checks the targets and appends benchmarks/ANALYSIS_CPU.md.
# Long: about 1.5 h on the 2-core reference VM. Needs the peers (benchmarks/install_peers.sh).
#   bash benchmarks/run_cpu_report.sh [OUTDIR]     (OUTDIR keeps the per-run JSON; default /tmp/ewc_fast_bench)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/ewc_fast_bench}
mkdir -p "$OUT"
PY=${PYTHON:-python}
CORE=${CORE:-0}
common=(--size full --tasks fisher fisher+mas --repeats 3 --threads 1)

# A: the transformer (T=128) workloads and the consolidation section
taskset -c "$CORE" "$PY" -m benchmarks.compare "${common[@]}" \
    --workloads transformer-T128 transformer-mha-T128 --out "$OUT/runA.md"
# B: the long sequences and the wide MLP (no consolidation: it is in A)
taskset -c "$CORE" "$PY" -m benchmarks.compare "${common[@]}" --no-consolidation \
    --workloads transformer-T512 transformer-mha-T512 mlp-3x4096 --out "$OUT/runB.md"
# C: the small workloads, whose ratios are the most sensitive to a busy machine
taskset -c "$CORE" "$PY" -m benchmarks.compare "${common[@]}" --no-consolidation \
    --workloads mlp-mnist cnn-32 embedding --out "$OUT/runC.md"

# D: the real Avalanche, in its own environment (scripts/avalanche_env.sh: torch 2.14.1 + torchvision):
#    its importance passes on the smaller workloads and its SI plugin hooks
AVPY=${AVALANCHE_PYTHON:-.venv-avalanche/bin/python}
if [ -x "$AVPY" ]; then
  taskset -c "$CORE" "$AVPY" -m benchmarks.compare "${common[@]}" --contenders avalanche \
      --consolidation-parts si-avalanche-lib --workloads mlp-mnist cnn-32 embedding transformer-T128 \
      --out "$OUT/runD.md"
fi

"$PY" -m benchmarks.compare --merge "$OUT/runA.json" "$OUT/runB.json" "$OUT/runC.json" \
    --notes benchmarks/ANALYSIS_CPU.md --out benchmarks/results/RESULTS.md
if [ -f "$OUT/runD.json" ]; then  # row by row: D adds the avalanche rows to workloads measured in A-C
  "$PY" -m benchmarks.compare --merge benchmarks/results/RESULTS.json "$OUT/runD.json" --merge-rows \
      --notes benchmarks/ANALYSIS_CPU.md --out benchmarks/results/RESULTS.md
fi
