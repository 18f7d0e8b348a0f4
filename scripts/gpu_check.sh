#!/usr/bin/env bash
# Everything that needs a GPU, in one run (for a session lent a GPU machine; see docs/kernels.md):
#   1. build the CUDA WKV-7 kernel and run the GPU tests (kernel vs the fp32/fp64 reference, all gradients),
#   2. compute-sanitizer memcheck on the small kernel cases,
#   3. the kernel benchmark (this kernel vs torch chunked vs flash-linear-attention when importable),
#   4. optionally the memory benchmark for one shape (MEMORY_SHAPES=1.5B, ...),
#   5. optionally the 1.5B persona recipe trained padded and packed on short dialogues (issue: >= 3x real tokens/s
#      packed; scripts/bench_packing.py, which also gives the recipe's peak memory),
#   6. optionally our training path against fla + peft LoRA at the 1.5B shape (scripts/bench_train.py; TRAIN_ARGS
#      narrows it, e.g. TRAIN_ARGS="--cases lora,fla-lora --contexts 4096x2").
#   7. optionally DeepSpeed ZeRO-2/3 through accelerate with the shipped configs: train, checkpoint, resume
#      (tests/training/test_deepspeed.py, one process per GPU).
# Wheels the machine lacks come from scripts/gpu_wheels.sh (run it here first; carry wheels/).
# Results go to $OUT (or ./gpu_results). Usage: OUT=/some/dir bash scripts/gpu_check.sh [step ...]
# where step is any of: tests sanitizer bench memory packing train deepspeed (default: tests sanitizer bench).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_results}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" RWKV_PEFT_KERNEL_CACHE="${RWKV_PEFT_KERNEL_CACHE:-$PWD/.kernel_cache}"
if [ -d wheels ]; then  # what scripts/gpu_wheels.sh fetched beforehand (the machine has no network)
  # into a folder of our own put first on PYTHONPATH (child processes and accelerate's ranks inherit it): the
  # machine's environment is left as it is, and a read-only one works too
  python -m pip install -q --disable-pip-version-check --no-index --no-deps --target "$PWD/.gpu_site" \
    wheels/*.whl 2>&1 | tail -2
  export PYTHONPATH="$PWD/.gpu_site:$PWD/wheels/bnb:$PYTHONPATH"
  python -c "import datasets, pydantic, bitsandbytes, deepspeed; print('wheels: datasets', datasets.__version__,
    'pydantic', pydantic.__version__, 'bitsandbytes', bitsandbytes.__version__, 'deepspeed', deepspeed.__version__)" \
    2>&1 | tail -3 | tee -a "$OUT/gpu.txt"
fi
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(tests sanitizer bench)
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee -a "$OUT/gpu.txt"
python -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
status=0
for step in "${steps[@]}"; do
  case "$step" in
    tests)
      python -m rwkv_peft.cli doctor 2>&1 | tee "$OUT/doctor.txt"
      python -m pytest -q -m cuda tests/ops/test_wkv7_cuda.py tests/ops/test_fla.py tests/models/test_packed_rows.py -x 2>&1 \
        | tee "$OUT/cuda_tests.txt" || status=1 ;;
    sanitizer)
      compute-sanitizer --tool memcheck python -m pytest -q -m cuda -k small tests/ops/test_wkv7_cuda.py \
        2>&1 | tail -40 | tee "$OUT/memcheck.txt" || status=1 ;;
    bench)
      python scripts/bench_wkv.py --json "$OUT/bench_wkv.json" 2>&1 | tee "$OUT/bench_wkv.txt" || status=1 ;;
    memory)
      for shape in ${MEMORY_SHAPES:-1.5B}; do
        python scripts/bench_memory.py --shapes "$shape" --json "$OUT/bench_memory_$shape.json" 2>&1 \
          | tee "$OUT/bench_memory_$shape.txt" || status=1
      done ;;
    packing)
      python scripts/bench_packing.py --recipe recipes/rwkv7-1.5b-state-persona.yaml --shape 1.5B --samples 512 \
        --device cuda --json "$OUT/bench_packing.json" 2>&1 | tee "$OUT/bench_packing.txt" || status=1 ;;
    train)
      python scripts/bench_train.py ${TRAIN_ARGS:-} --json "$OUT/bench_train.json" 2>&1 \
        | tee "$OUT/bench_train.txt" || status=1 ;;
    deepspeed)
      python -m pytest -q -m cuda tests/training/test_deepspeed.py 2>&1 | tee "$OUT/deepspeed.txt" || status=1 ;;
    *) echo "unknown step: $step" >&2; status=2 ;;
  esac
done
exit $status
