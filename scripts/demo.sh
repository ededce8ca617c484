#!/usr/bin/env bash
# Sets up everything and runs the demo: trains the digits net, compresses it, writes the report.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh report
. .venv/bin/activate
squeezer demo --out "${1:-runs/demo}"
