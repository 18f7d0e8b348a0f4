"""DeepSpeed ZeRO-2 / ZeRO-3 through accelerate with the shipped configs (recipes/accelerate/deepspeed_zero*.yaml):
train, checkpoint (DeepSpeed engine checkpoints), resume exactly, and train as DDP trains.

On the CPU: two processes over gloo (DeepSpeed's CPU accelerator), through ``deepspeed_cpu_cli.py`` beside this
file (accelerate takes its DeepSpeed path only for GPU processes; that file gives it the gloo backend and changes
nothing else). On a CUDA GPU (marked cuda; ``scripts/gpu_check.sh deepspeed``): ``-m rwkv_peft.cli``, one process
per GPU."""
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.training.test_cli import write_recipe
from tests.training.test_fsdp import assert_resumed_exactly, launch, weights

ROOT = Path(__file__).resolve().parents[2]
CLI = Path(__file__).with_name("deepspeed_cpu_cli.py")
METHODS = {  # state tuning alone goes to DDP under DeepSpeed (test_fsdp.py::test_state_tuning_alone_is_sent_to_ddp)
    "lora+state": ["method.lora.enabled=true", "method.lora.targets=all", "method.state_tuning.enabled=true"],
    "full": [],
}
_ddp_runs = {}  # (where, method) -> (summary, final weights) of the same recipe under DDP


def engine(where: str) -> dict:
    """How to launch on ``where``: processes and program (skips where DeepSpeed cannot run)."""
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed (pip install rwkv-peft[deepspeed])")
    if shutil.which("accelerate") is None:
        pytest.skip("accelerate launcher not on PATH")
    if where == "cpu":
        return dict(processes=2, program=(str(CLI),))
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    return dict(processes=torch.cuda.device_count(), program=("-m", "rwkv_peft.cli"))


def ddp_run(where: str, method: str, recipe: Path, processes: int, cwd: Path):
    """The recipe trained with DDP (recipes/accelerate/ddp.yaml) on as many processes, once per method."""
    if (where, method) not in _ddp_runs:
        launch(recipe, "ddp", METHODS[method], cwd, config=ROOT / "recipes" / "accelerate" / "ddp.yaml",
               processes=processes, program=("-m", "rwkv_peft.cli"))
        out = cwd / "out" / "ddp"
        _ddp_runs[where, method] = (json.loads((out / "summary.json").read_text()),
                                    weights(out / ("model" if method == "full" else "adapter")))
    return _ddp_runs[where, method]


@pytest.mark.slow
@pytest.mark.parametrize("where", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_deepspeed_trains_saves_and_resumes_exactly(where, stage, method, tmp_path, tiny_model, chat_file, tok_dir):
    run = dict(config=ROOT / "recipes" / "accelerate" / f"deepspeed_zero{stage}.yaml", **engine(where))
    recipe = write_recipe(tmp_path, tiny_model, chat_file, tok_dir, name="ds", extra_train="\n  eval_every: 2")
    launch(recipe, "a", METHODS[method], tmp_path, **run)                 # 3 steps, a checkpoint after step 2
    a = tmp_path / "out" / "a"
    ckpt = a / "checkpoints" / "step-0000002"
    summary = json.loads((a / "summary.json").read_text())
    assert summary["world_size"] == run["processes"] and summary["steps"] == 3 and len(summary["evals"]) == 2
    # a DeepSpeed engine checkpoint (ZeRO-3: the weights partitioned too), with a ready adapter beside it
    shards = {p.name for p in (ckpt / "pytorch_model").iterdir()}
    ranks = range(run["processes"])
    assert {f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in ranks} <= shards
    assert ({f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in ranks} if stage == 3
            else {"mp_rank_00_model_states.pt"}) <= shards
    assert not (ckpt / "trainable_0.safetensors").exists()
    final = a / ("model" if method == "full" else "adapter")
    if method != "full":
        assert weights(ckpt / "adapter")

    # the same training as DDP: losses, evaluations and the whole weights written at the end. ZeRO-2 gives DDP's
    # weights to the bit here; ZeRO-3 sums the gradients in another order (reduce-scatter over flat partitions) and
    # AdamW, whose first steps are about lr x sign(gradient), turns that rounding into up to ~1e-4 where a gradient
    # is near 0: the bound is a tenth of one step at lr 3e-3
    ddp_summary, ddp_weights = ddp_run(where, method, recipe, run["processes"], tmp_path)
    assert summary["final_loss"] == pytest.approx(ddp_summary["final_loss"], rel=1e-5)
    assert [e["loss"] for e in summary["evals"]] == pytest.approx([e["loss"] for e in ddp_summary["evals"]], rel=1e-5)
    ours = weights(final)
    assert ours.keys() == ddp_weights.keys()
    for k, w in ddp_weights.items():
        assert ours[k].shape == w.shape and (ours[k] - w).abs().max() <= 3e-4, k

    launch(recipe, "b", METHODS[method] + [f"train.resume={ckpt}"], tmp_path, **run)
    assert_resumed_exactly(summary, final, tmp_path / "out" / "b", tol=1e-5)
