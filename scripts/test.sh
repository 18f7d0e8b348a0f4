#!/usr/bin/env bash
# Install rwkv-peft with its test dependencies and run the test suite (CPU: a few minutes; GPU tests skip).
# Usage: bash scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
python -m pytest -q "$@"
