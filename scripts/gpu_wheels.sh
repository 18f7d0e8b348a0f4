#!/usr/bin/env bash
# Wheels the GPU machine lacks, fetched here beforehand (that machine has no network; ../shared/FACTS.md lists
# what it has: torch 2.11 + CUDA 13, triton, transformers, peft, accelerate, huggingface_hub, safetensors, ...).
# Python 3.12, x86-64, into wheels/ (git-ignored; about 10 MB), for a GPU session to carry and install:
#   bash scripts/gpu_wheels.sh            # here, with network
#   bash scripts/gpu_check.sh [step ...]  # there (carry wheels/): installs them first (pip --no-index) and puts
#                                        # bitsandbytes on PYTHONPATH
# bitsandbytes is unpacked and trimmed to its Python files and the CUDA 13 / CPU libraries (43 MB -> about 5 MB).
# Usage: bash scripts/gpu_wheels.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-wheels}"
mkdir -p "$OUT"
dl() {
  python -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    --platform any -d "$OUT" "$@"
}
# datasets and what it needs beyond that machine; pydantic (recipes); fla (the WKV path without a compiler);
# the World tokenizer's fast encoder; gguf (export)
dl "datasets==5.2.0" dill multiprocess xxhash pydantic pydantic-core annotated-types typing-inspection \
   "flash-linear-attention==0.6.0" "fla-core==0.6.0" einops "pyrwkv-tokenizer>=0.9.1" "gguf>=0.17.1"

# DeepSpeed (ZeRO-2/3 checks) ships a source distribution only: built here into a pure-Python wheel without
# its compiled ops (DS_BUILD_OPS=0; it compiles what it needs on that machine, which has nvcc), plus what it needs
dl hjson msgpack psutil py-cpuinfo ninja
DS_SRC_DIR="$(mktemp -d)"
python -m pip download -q --disable-pip-version-check --no-deps --no-binary=:all: -d "$DS_SRC_DIR" "deepspeed==0.19.8"
DS_BUILD_OPS=0 python -m pip wheel -q --disable-pip-version-check --no-deps --no-build-isolation -w "$OUT" \
  "$DS_SRC_DIR"/deepspeed-*.tar.gz
rm -rf "$DS_SRC_DIR"

# bitsandbytes: unpack, keep the Python package and the CUDA 13 + CPU libraries only
BNB_WHEEL_DIR="$(mktemp -d)"
dl --dest "$BNB_WHEEL_DIR" "bitsandbytes==0.50.2" 2>/dev/null || python -m pip download -q --no-deps \
  --only-binary=:all: --python-version 3.12 --platform manylinux_2_24_x86_64 -d "$BNB_WHEEL_DIR" "bitsandbytes==0.50.2"
rm -rf "$OUT/bnb" && mkdir -p "$OUT/bnb"
python - "$BNB_WHEEL_DIR" "$OUT/bnb" <<'PY'
import sys, zipfile, pathlib
src, dst = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
wheel = next(src.glob("bitsandbytes-*.whl"))
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        lib = name.rsplit("/", 1)[-1]
        if lib.startswith("libbitsandbytes_") and not lib.startswith(("libbitsandbytes_cuda130", "libbitsandbytes_cpu")):
            continue
        z.extract(name, dst)
print("bitsandbytes trimmed:", sum(f.stat().st_size for f in dst.rglob("*") if f.is_file()) // 2**20, "MB")
PY
rm -rf "$BNB_WHEEL_DIR"
ls -la "$OUT" | tail -n +2
du -sh "$OUT"
