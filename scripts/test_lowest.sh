#!/usr/bin/env bash
# Run the model, generation, tokenizer and peft tests against the LOWEST transformers, peft and accelerate that
# pyproject.toml admits (its lower bounds, read from the file), in a second virtual environment (.venv-lowest)
# that sees the main install (scripts/install.sh) for everything else.
# Usage: bash scripts/test_lowest.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
pins=$(python - <<'PY'
import re, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
for name in ("transformers", "peft", "accelerate"):
    spec = next(d for d in deps if re.match(rf"{name}\b", d))
    low = re.search(r">=\s*([\w.]+)", spec).group(1)
    # transformers' hub-kernels extra: the `kernels` release that this transformers was written against (the main
    # install's newer transformers pulls a newer `kernels`, which transformers 5.0 cannot import)
    extra = "[hub-kernels]" if name == "transformers" else ""
    print(f"{name}{extra}=={low}")
PY
)
python -m venv --system-site-packages .venv-lowest
.venv-lowest/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt $pins
.venv-lowest/bin/python -c "import transformers, peft, accelerate
print('lowest versions: transformers', transformers.__version__, '| peft', peft.__version__,
      '| accelerate', accelerate.__version__)"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
# what touches transformers / peft / accelerate: the HF model classes, generation, the loss, every version's
# registration and conversion, the peft methods, the tokenizer (the per-version numerics against the official
# package do not depend on these libraries and run once, in the main suite)
.venv-lowest/bin/python -m pytest -q tests/models/test_rwkv7_hf.py tests/models/test_generation.py \
    tests/models/test_loss.py tests/models/test_convert.py tests/test_versions.py tests/methods tests/tokenization "$@"
