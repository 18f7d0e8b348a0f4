#!/usr/bin/env bash
# Set everything up and run a real fine-tune on the CPU with nothing to download: the tiny RWKV-7 model that
# ships with rwkv-peft learns a pirate persona (LoRA + state tuning) in about a minute.
# Usage: bash scripts/quickstart.sh [--set train.max_steps=100 ...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
rwkv-peft train recipes/quickstart.yaml --set output.overwrite=true "$@"
