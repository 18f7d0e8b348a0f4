#!/usr/bin/env bash
# Install rwkv-peft with its test dependencies (CPU torch pinned first) and run the test suite.
# Usage: bash scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q torch==2.13.0
python -m pip install -q -c constraints.txt -e ".[dev,logging]"
python -m pytest -q "$@"
