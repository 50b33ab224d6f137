#!/usr/bin/env bash
# Fresh machine -> lint (ruff check + ruff format --check) and the full test suite (the command the
# README gives and CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
echo "[lint] ruff check + ruff format --check"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
exec .venv/bin/python -m pytest -q "$@"
