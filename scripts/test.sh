#!/usr/bin/env bash
# Sets up everything and runs the test suite (the `slow` tests too when SLOW=1).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh report,onnx,hf,dev
. .venv/bin/activate
if [ "${SLOW:-0}" = 1 ]; then
  python -m pytest "$@"
else
  python -m pytest -m "not slow" "$@"
fi
