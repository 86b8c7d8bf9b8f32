#!/usr/bin/env bash
# Runs the whole CPU test suite (the README's test command calls this).
set -euo pipefail
cd "$(dirname "$0")/.."
export TRITON_INTERPRET="${TRITON_INTERPRET:-1}"
python3 -m ruff check .
python3 -m pytest -q -p no:cacheprovider "$@"
