#!/usr/bin/env bash
# Install rwkv-peft (editable) with the test and logging extras; CPU torch is pinned first (an unpinned torch
# pulls a multi-GB CUDA build). On a GPU machine install your CUDA torch first and this leaves it alone.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python -c "import torch" 2>/dev/null; then
    python -m pip install -q torch==2.13.0
fi
python -m pip install -q -c constraints.txt -e ".[dev,logging]"
