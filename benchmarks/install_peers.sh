#!/usr/bin/env bash
# Installs the peer libraries the comparison benchmark measures, side by side with ewc_fast, into
# ./.venv WITHOUT touching torch (never let pip resolve another torch on a CPU machine).
# Avalanche is not installable here (needs torchvision, which has no CPU build): its algorithms are
# reproduced as labelled baselines inside the benchmark instead.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/setup_env.sh
VPY=.venv/bin/python
TORCH_BEFORE=$("$VPY" -c "import torch; print(torch.__version__)")
"$VPY" -m pip install -q opacus asdfghjkl "torch==${TORCH_BEFORE%%+*}"
"$VPY" -m pip install -q --no-deps backpack-for-pytorch unfoldNd einops nngeometry
"$VPY" -m pip install -q packaging
TORCH_AFTER=$("$VPY" -c "import torch; print(torch.__version__)")
if [ "$TORCH_BEFORE" != "$TORCH_AFTER" ]; then
  echo "install_peers: torch changed from $TORCH_BEFORE to $TORCH_AFTER -- refusing to continue" >&2
  exit 1
fi
"$VPY" - <<'PY'
import importlib
for mod in ("opacus", "asdl", "backpack", "nngeometry"):
    try:
        m = importlib.import_module(mod)
        print(f"[peers] {mod} {getattr(m, '__version__', '?')} ok")
    except Exception as exc:  # report, don't hide
        print(f"[peers] {mod} FAILED to import: {type(exc).__name__}: {exc}")
PY
