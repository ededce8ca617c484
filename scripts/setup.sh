#!/usr/bin/env bash
# Creates .venv (if needed) and installs squeezer with the given extras.
# torch==2.13.0 is installed first, on its own: it is the CPU build, and the package's torch range
# then installs nothing more (a bare `torch` would pull a multi-GB CUDA build).
# Usage: bash scripts/setup.sh [EXTRAS]     e.g. bash scripts/setup.sh report,dev
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-report}"
py="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$py" -m venv .venv
fi
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! python -c 'import torch, sys; sys.exit(torch.__version__.split("+")[0] != "2.13.0")' 2>/dev/null; then
  python -m pip install -q "torch==2.13.0"
fi
python -m pip install -q -e ".[${extras}]"
