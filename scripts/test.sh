#!/usr/bin/env bash
# Sets up everything and runs the test suite (the `slow` tests too when SLOW=1).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh report,onnx,hf,dev
. .venv/bin/activate
# timm's LAMB and LARS are the oracle of squeezer.train.optim's tests. Without its dependencies:
# they would pull torchvision, which does not import beside this torch; the tests load only
# timm's optimizer files.
python -m pip install -q --no-deps "timm==1.0.31"
if [ "${SLOW:-0}" = 1 ]; then
  python -m pytest "$@"
else
  python -m pytest -m "not slow" "$@"
fi
