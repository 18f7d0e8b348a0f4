"""FSDP2 through accelerate on two CPU processes (gloo): train, save, resume, and the gathered outputs.

accelerate runs FSDP only on GPUs; ``fsdp_cpu_cli.py`` (beside this file) turns its FSDP2 path on for CPU
processes, launched with the shipped ``recipes/accelerate/fsdp2.yaml``. The loop must keep every process in
step (each forward all-gathers the blocks' shards), write the adapter/model from whole weights, and resume from
accelerate's sharded checkpoint exactly. (The same runs under DDP give the same losses and weights to ~1e-6.)
"""
import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.training.test_cli import write_recipe

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "recipes" / "accelerate" / "fsdp2.yaml"
CLI = Path(__file__).with_name("fsdp_cpu_cli.py")

METHODS = {
    # LoRA + state in chunk mode (chunks carry the state; two chunks per backward window), two micro-batches
    "lora+state-chunked": ["method.lora.enabled=true", "method.lora.targets=all", "method.state_tuning.enabled=true",
                           "data.long_context.mode=chunk", "data.long_context.chunk_len=16",
                           "data.long_context.grad_chunks=2", "train.grad_accum=2"],
    "full": ['eval.prompts=["Tell me about owls."]', "eval.max_new_tokens=6"],
}


def launch(recipe, run_name, sets, cwd, config=CONFIG, processes=2, program=(str(CLI),)):
    """``rwkv-peft train`` through ``accelerate launch --config_file config`` (by default FSDP2 on two CPU
    processes through the CPU patch; test_deepspeed.py runs ``-m rwkv_peft.cli`` on a GPU)."""
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    cmd = ["accelerate", "launch", "--config_file", str(config), "--num_processes", str(processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *program, "train",
           str(recipe), "--progress", "off", "--set", f"output.run_name={run_name}",
           *[a for kv in sets for a in ("--set", kv)]]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=cwd)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def assert_resumed_exactly(summary: dict, final: Path, resumed_run: Path, tol: float) -> None:
    """The resumed run ends at the same step and loss as the whole run, with the same output weights."""
    resumed = json.loads((resumed_run / "summary.json").read_text())
    assert resumed["steps"] == summary["steps"]
    assert resumed["final_loss"] == pytest.approx(summary["final_loss"], rel=tol)
    wa, wb = weights(final), weights(resumed_run / final.name)
    assert wa.keys() == wb.keys() and len(wa) > 0
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < tol


def weights(folder: Path):
    files = ["adapter_model.safetensors", "state_adapter.safetensors", "model.safetensors"]
    return {f"{f}:{k}": v for f in files if (folder / f).is_file() for k, v in load_file(folder / f).items()}


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHODS))
def test_fsdp2_trains_saves_and_resumes_exactly(method, tmp_path, tiny_model, chat_file, tok_dir, capsys):
    if shutil.which("accelerate") is None:
        pytest.skip("accelerate launcher not on PATH")
    recipe = write_recipe(tmp_path, tiny_model, chat_file, tok_dir, name="fsdp", extra_train="\n  eval_every: 2")
    launch(recipe, "a", METHODS[method], tmp_path)                      # 3 steps, a checkpoint after step 2
    a = tmp_path / "out" / "a"
    ckpt = a / "checkpoints" / "step-0000002"
    # accelerate's sharded FSDP checkpoint, not our trainable-only file; a ready adapter beside it
    assert (ckpt / "pytorch_model_fsdp_0").is_dir() and (ckpt / "optimizer_0").is_dir()
    assert not (ckpt / "trainable_0.safetensors").exists()
    summary = json.loads((a / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 3 and len(summary["evals"]) == 2
    assert all(math.isfinite(x) for x in summary["evals"][0].values())
    final = a / ("model" if method == "full" else "adapter")
    if method != "full":
        assert weights(ckpt / "adapter")  # whole tensors gathered from the shards

    # resume from the step-2 checkpoint into another run: step 3 comes out the same
    launch(recipe, "b", METHODS[method] + [f"train.resume={ckpt}"], tmp_path)
    assert_resumed_exactly(summary, final, tmp_path / "out" / "b", tol=1e-6)

    # the gathered output is the whole model/adapter: the eval command (one process) gives the run's eval loss
    from rwkv_peft.cli import main
    sets = [a for kv in METHODS[method] if kv.startswith("data.") for a in ("--set", kv)]
    capsys.readouterr()
    assert main(["eval", str(recipe), "--set", "output.run_name=a", *sets, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["loss"] == pytest.approx(summary["evals"][-1]["loss"], rel=1e-5)


def test_lockstep_eval_shares():
    """Every process evaluates as many batches of as many rows; -1 stands for a row without loss."""
    from rwkv_peft.training.evaluation import shares
    assert shares(5, 2, 0, 2, equal=True) == [[0, 2], [4]]
    assert shares(5, 2, 1, 2, equal=True) == [[1, 3], [-1]]
    assert shares(5, 2, 1, 2) == [[1, 3]]
    assert shares(1, 4, 1, 2, equal=True) == [[-1]]


def test_pad_batch():
    from rwkv_peft.training.batches import batch_of, pad_batch
    b = pad_batch(batch_of([{"input_ids": [5, 6], "labels": [-100, 6]}], [0]), 4)
    assert b["input_ids"].tolist() == [[5, 6, 0, 0]] and b["labels"].tolist() == [[-100, 6, -100, -100]]
    assert b["attention_mask"].tolist() == [[1, 1, 0, 0]]


@pytest.mark.parametrize("name", ["deepspeed_zero2.yaml", "deepspeed_zero3.yaml"])
def test_deepspeed_configs_parse(name):
    """The DeepSpeed configs (untested on GPUs) load as accelerate configs and make the DeepSpeed config the loop
    expects once the recipe's values are filled in. DeepSpeed itself is not needed for this."""
    import types

    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DeepSpeedPlugin, DistributedType

    from rwkv_peft.training.setup import configure_engine
    cfg = load_config_from_file(str(ROOT / "recipes" / "accelerate" / name))
    assert cfg.distributed_type == DistributedType.DEEPSPEED and cfg.mixed_precision == "no"
    plugin = DeepSpeedPlugin(**cfg.deepspeed_config)
    plugin.set_mixed_precision("bf16")
    acc = types.SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, mixed_precision="bf16",
                                state=types.SimpleNamespace(deepspeed_plugin=plugin))
    recipe = types.SimpleNamespace(train=types.SimpleNamespace(batch_size=4, grad_clip=0.5),
                                   method=types.SimpleNamespace(kind="lora",
                                                                lora=types.SimpleNamespace(enabled=True, init=None)))
    configure_engine(acc, recipe)
    ds = plugin.deepspeed_config
    stage = 3 if "zero3" in name else 2
    assert ds["zero_optimization"]["stage"] == stage and ds["bf16"] == {"enabled": True}
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 1
    assert ds["gradient_clipping"] == 0.5 and "optimizer" not in ds and "scheduler" not in ds
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] == (stage == 3)


@pytest.mark.parametrize("engine", ["FSDP", "DEEPSPEED"])
def test_state_tuning_alone_is_sent_to_ddp(engine):
    import types

    from accelerate.utils import DistributedType

    from rwkv_peft.training.setup import TrainingSetupError, refuse_unsupported
    acc = types.SimpleNamespace(distributed_type=DistributedType[engine], is_fsdp2=True,
                                state=types.SimpleNamespace(deepspeed_plugin=types.SimpleNamespace(zero_stage=2)))
    recipe = types.SimpleNamespace(method=types.SimpleNamespace(
        kind="state", lora=types.SimpleNamespace(enabled=False, init=None)))
    with pytest.raises(TrainingSetupError, match="with DDP"):
        refuse_unsupported(acc, recipe)
