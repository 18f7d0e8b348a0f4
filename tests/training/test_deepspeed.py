"""DeepSpeed ZeRO-2 / ZeRO-3 through accelerate with the shipped configs (recipes/accelerate/deepspeed_zero*.yaml):
train, checkpoint, resume exactly. DeepSpeed has no CPU path we can use, so these run on a CUDA GPU with
deepspeed installed (scripts/gpu_check.sh deepspeed; one process per GPU there is)."""
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.training.test_cli import write_recipe
from tests.training.test_fsdp import assert_resumed_exactly, launch

ROOT = Path(__file__).resolve().parents[2]
METHODS = {  # state tuning alone goes to DDP under DeepSpeed (test_fsdp.py::test_state_tuning_alone_is_sent_to_ddp)
    "lora+state": ["method.lora.enabled=true", "method.lora.targets=all", "method.state_tuning.enabled=true"],
    "full": [],
}


@pytest.mark.cuda
@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_deepspeed_trains_saves_and_resumes_exactly(stage, method, tmp_path, tiny_model, chat_file, tok_dir):
    if not torch.cuda.is_available() or importlib.util.find_spec("deepspeed") is None:
        pytest.skip("needs a CUDA GPU and deepspeed")
    if shutil.which("accelerate") is None:
        pytest.skip("accelerate launcher not on PATH")
    config = ROOT / "recipes" / "accelerate" / f"deepspeed_zero{stage}.yaml"
    n = torch.cuda.device_count()
    run = dict(config=config, processes=n, program=("-m", "rwkv_peft.cli"))
    recipe = write_recipe(tmp_path, tiny_model, chat_file, tok_dir, name="ds", extra_train="\n  eval_every: 2")
    launch(recipe, "a", METHODS[method], tmp_path, **run)                 # 3 steps, a checkpoint after step 2
    a = tmp_path / "out" / "a"
    ckpt = a / "checkpoints" / "step-0000002"
    summary = json.loads((a / "summary.json").read_text())
    assert summary["world_size"] == n and summary["steps"] == 3 and len(summary["evals"]) == 2
    assert ckpt.is_dir()
    final = a / ("model" if method == "full" else "adapter")

    launch(recipe, "b", METHODS[method] + [f"train.resume={ckpt}"], tmp_path, **run)
    assert_resumed_exactly(summary, final, tmp_path / "out" / "b", tol=1e-5)
