#!/usr/bin/env bash
# Fresh machine -> the main job: `ewc-fast demo` on the embedded real MNIST subset.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/ewc-fast demo "$@"
